"""`ternlm serve` as production runs it, in real processes: limits shared by two servers through a real Redis,
an audit log that survives SIGKILL, TLS, the refusal to expose an unauthenticated server, and the `keys` and
`audit` commands."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest

from redis_server import redis_url  # noqa: F401
from ternlm.audit import open_log
from ternlm.cli import main
from ternlm.keys import KeyStore
from ternlm.server import serve_subprocess

BASE = ["--threads", "1", "--log-level", "warning", "--slots", "2"]
COMPLETION = {"model": "default", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True}


def test_two_servers_share_rate_limits_through_redis(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    keys = tmp_path / "keys.db"
    key = KeyStore(keys).create("shared", "user", rpm=3)[0]
    args = [*BASE, "--keys-db", str(keys), "--redis-url", redis_url, "--response-cache", "0"]
    with serve_subprocess(args) as a, serve_subprocess(args) as b:
        auth = {"Authorization": f"Bearer {key}"}
        statuses = [httpx.post(url + "/v1/completions", json=COMPLETION, headers=auth, timeout=30).status_code
                    for url in (a, b, a, b, a, b)]
    assert statuses == [200, 200, 200, 429, 429, 429]


def test_response_cache_shared_through_redis(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    args = [*BASE, "--redis-url", redis_url]
    with serve_subprocess(args) as a, serve_subprocess(args) as b:
        first = httpx.post(a + "/v1/completions", json={**COMPLETION, "prompt": "shared cache"}, timeout=30)
        second = httpx.post(b + "/v1/completions", json={**COMPLETION, "prompt": "shared cache"}, timeout=30)
    assert "x-ternlm-cache" not in first.headers and second.headers["x-ternlm-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]


def test_audit_log_survives_sigkill_with_every_completed_request(tmp_path: Path) -> None:
    audit = tmp_path / "audit.db"
    completed: list[str] = []
    stop = threading.Event()

    def client(url: str, worker: int) -> None:
        for i in range(1000):
            if stop.is_set():
                return
            prompt = f"request {worker}-{i}"
            try:
                r = httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": prompt}, timeout=30)
            except httpx.HTTPError:
                return  # the server was killed under this request
            if r.status_code == 200:
                completed.append(prompt)

    with serve_subprocess([*BASE, "--audit-db", str(audit), "--audit-content"]) as url:
        workers = [threading.Thread(target=client, args=(url, w)) for w in range(4)]
        for w in workers:
            w.start()
        while len(completed) < 40:
            threading.Event().wait(0.05)
        os.kill(url.process.pid, signal.SIGKILL)
        stop.set()
        for w in workers:
            w.join()
    log = open_log(audit)
    result = log.verify()
    assert result.ok, result.reason
    logged = {r["prompt"] for r in log.records() if r["status"] == 200}
    assert set(completed) <= logged
    assert main(["audit", "verify", "--audit-db", str(audit)]) == 0


def test_tls(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with serve_subprocess([*BASE, "--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file)]) as url:
        assert url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert_file))
        assert httpx.get(url + "/v1/models", verify=trusted).json()["data"][0]["id"] == "default"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)


def test_refuses_network_bind_without_auth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keys = str(tmp_path / "keys.db")
    assert main(["serve", "--host", "0.0.0.0", "--keys-db", keys]) == 1
    assert "refusing to serve 0.0.0.0 without authentication" in capsys.readouterr().err


def test_keys_and_audit_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = str(tmp_path / "keys.db")
    assert main(["keys", "create", "--name", "alice", "--role", "metrics", "--rpm", "10", "--keys-db", db]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyStore(db).verify(key).name == "alice"
    assert main(["keys", "list", "--json", "--keys-db", db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["role"], k["rpm"]) for k in listed] == [("alice", "metrics", 10)]
    assert key not in json.dumps(listed)
    assert main(["keys", "revoke", "alice", "--keys-db", db]) == 0
    assert KeyStore(db).verify(key) is None
    assert main(["keys", "revoke", "alice", "--keys-db", db]) == 1
    assert main(["audit", "verify", "--audit-db", str(tmp_path / "missing.db")]) == 1


def test_connection_limit_answers_503() -> None:
    with serve_subprocess([*BASE, "--max-connections", "3"]) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 5
            while httpx.get(url + "/v1/models", timeout=30).status_code != 503:
                assert time.monotonic() < deadline, "the connection limit never applied"
                time.sleep(0.05)
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 5
        while httpx.get(url + "/v1/models", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover after the connections closed"
            time.sleep(0.05)


def test_streams_closed_at_done_are_all_audited(tmp_path: Path) -> None:
    # Clients such as the openai SDK hang up as soon as `data: [DONE]` arrives; that cancels the response
    # task, and the audit record must be written anyway.
    audit = tmp_path / "audit.db"
    with serve_subprocess([*BASE, "--audit-db", str(audit), "--response-cache", "0"]) as url:
        for i in range(60):
            body = {**COMPLETION, "prompt": f"stream {i}", "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        break
    records = [r for r in open_log(audit).records() if r["route"] == "/v1/completions"]
    assert len(records) == 60 and all(r["status"] == 200 for r in records)


def test_idle_keep_alive_connections_close_after_idle_timeout() -> None:
    with serve_subprocess([*BASE, "--idle-timeout", "1"]) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b'{"status":"ok"}' not in answer:
                answer += s.recv(4096)
            assert b"200 OK" in answer
            started = time.monotonic()
            assert s.recv(4096) == b""  # the server hung up the idle connection
            assert 0.5 < time.monotonic() - started < 5
