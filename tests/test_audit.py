"""The audit log: chain and anchor catch every edit, content encryption, concurrent and killed writers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm.audit import (
    AuditEntry,
    AuditLog,
    VerifyResult,
    _canonical,
    _record_mac,
    load_content_key,
    load_secret,
)
from ternlm.errors import FormatError, ParamError

SECRET = b"s" * 32
KEY = bytes(range(32))
SRC = str(Path(__file__).resolve().parents[1] / "src")
N = 6  # records in the shared base log


def entry(i: int, **kw: object) -> AuditEntry:
    base = dict(key_name=f"key{i % 2}" if i % 3 else None, route="/v1/chat/completions", model="tiny",
                prompt_tokens=10 + i, completion_tokens=i, status=200 if i % 4 else 429, latency_ms=12.5 + i,
                client=f"10.0.0.{i}:5000", prompt=f"secret prompt number {i}", completion=f"answer {i}",
                extra={"cached": bool(i % 2), "pii_masked": i} if i % 2 else None)
    base.update(kw)
    return AuditEntry(**base)


def copy_log(src: Path, dst_dir: Path) -> Path:
    """A private copy of a closed log (database + anchor) to tamper with."""
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    shutil.copy(src.with_name(src.name + ".anchor"), dst.with_name(dst.name + ".anchor"))
    return dst


@pytest.fixture(scope="module")
def base_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "audit.db"
    with AuditLog(path, SECRET) as log:
        for i in range(1, N + 1):
            assert log.append(entry(i)) == i
    return path


@pytest.fixture
def log_copy(base_log: Path, tmp_path: Path) -> Path:
    return copy_log(base_log, tmp_path)


def verify(path: Path, secret: bytes = SECRET) -> VerifyResult:
    with AuditLog(path, secret) as log:
        return log.verify()


def edit(path: Path, sql: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def row_dict(conn: sqlite3.Connection, seq: int) -> dict:
    cur = conn.execute("SELECT * FROM audit WHERE seq = ?", (seq,))
    return dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))


# --- roundtrip ---

def test_append_verify_records_export(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with AuditLog(path, SECRET) as log:
        assert log.verify() == VerifyResult(True, 0, None, "chain intact: 0 records")
        assert [log.append(entry(i)) for i in range(1, 4)] == [1, 2, 3]
        assert log.verify() == VerifyResult(True, 3, None, "chain intact: 3 records")
        recs = list(log.records())
        out = io.StringIO()
        assert log.export(out) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == recs
    r = recs[0]
    e = entry(1)
    assert r["seq"] == 1 and r["key_name"] == e.key_name and r["route"] == e.route and r["model"] == "tiny"
    assert (r["prompt_tokens"], r["completion_tokens"], r["status"], r["latency_ms"]) == (11, 1, 200, 13.5)
    assert r["client"] == "10.0.0.1:5000" and r["prompt"] == e.prompt and r["completion"] == e.completion
    assert r["extra"] == {"cached": True, "pii_masked": 1} and recs[1]["extra"] is None
    assert r["encrypted"] is False and r["prev_mac"] == "00" * 32 and recs[1]["prev_mac"] == r["mac"]
    assert r["time"].endswith("Z") and isinstance(r["unix_time"], float)
    assert recs[0]["unix_time"] <= recs[1]["unix_time"] <= recs[2]["unix_time"]
    # Reopening continues the chain.
    with AuditLog(path, SECRET) as log:
        assert log.append(entry(4, prompt=None, completion=None, key_name=None, model=None, client=None)) == 4
        assert log.verify().ok and list(log.records())[-1]["prompt"] is None


def test_odd_input(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db", SECRET) as log:
        seq = log.append(entry(1, prompt="lone \ud800 surrogate, NUL \x00, 日本語", extra={"é": [1, None, "x"]}))
        rec = next(log.records())
        assert rec["prompt"] == "lone \ufffd surrogate, NUL \x00, 日本語" and rec["extra"] == {"é": [1, None, "x"]}
        for bad in ({"latency_ms": float("nan")}, {"status": 200.0}, {"route": None}, {"extra": {"x": object()}}):
            with pytest.raises(ParamError):
                log.append(entry(2, **bad))
        assert log.append(entry(2)) == seq + 1 and log.verify().ok


# --- content encryption ---

def test_content_encryption(tmp_path: Path) -> None:
    path = tmp_path / "enc.db"
    with AuditLog(path, SECRET, content_key=KEY) as log:
        for i in range(1, 4):
            log.append(entry(i))
        assert [r["prompt"] for r in log.records()] == [entry(i).prompt for i in range(1, 4)]
        assert not any(r["encrypted"] for r in log.records())
        assert next(log.records(decrypt=False))["encrypted"] is True
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"secret prompt number" not in on_disk and b"answer 2" not in on_disk

    with AuditLog(path, SECRET) as log:  # no content key: ciphertext, flagged
        assert log.verify().ok
        out = io.StringIO()
        log.export(out)
        first = json.loads(out.getvalue().splitlines()[0])
        assert first["encrypted"] is True and len(base64.b64decode(first["prompt"])) > 12 + 16

    with AuditLog(path, SECRET, content_key=bytes(32)) as log:  # wrong key: verify works, decrypt says so
        assert log.verify().ok
        with pytest.raises(ParamError, match="content key does not open the prompt of record 1"):
            list(log.records())


def test_ciphertexts_bound_to_record_and_field(tmp_path: Path) -> None:
    """Even someone holding the HMAC secret cannot move a ciphertext to another field undetected."""
    path = tmp_path / "enc.db"
    with AuditLog(path, SECRET, content_key=KEY) as log:
        log.append(entry(1))
        last = log.append(entry(2))
    conn = sqlite3.connect(path)
    row = row_dict(conn, last)
    row["prompt"], row["completion"] = row["completion"], row["prompt"]
    fields = {k: v for k, v in row.items() if k not in ("prev_mac", "mac")}
    mac = _record_mac(SECRET, row["prev_mac"], fields)
    with conn:
        conn.execute("UPDATE audit SET prompt = ?, completion = ?, mac = ? WHERE seq = ?",
                     (row["prompt"], row["completion"], mac, last))
    conn.close()
    with AuditLog(path, SECRET, content_key=KEY) as log:
        log._write_anchor(last, mac)
        assert log.verify().ok
        with pytest.raises(ParamError, match=f"prompt of record {last}"):
            list(log.records())


# --- tamper detection ---

ALTERATIONS = {
    "time": st.floats(0, 4e9),
    "key_name": st.one_of(st.none(), st.text(max_size=8)),
    "route": st.text(max_size=8),
    "model": st.one_of(st.none(), st.text(max_size=8)),
    "prompt_tokens": st.integers(0, 10**6),
    "completion_tokens": st.integers(0, 10**6),
    "status": st.integers(100, 599),
    "latency_ms": st.floats(0, 1e6),
    "client": st.one_of(st.none(), st.text(max_size=8)),
    "prompt": st.one_of(st.none(), st.text(max_size=8), st.binary(max_size=8)),
    "completion": st.one_of(st.none(), st.text(max_size=8)),
    "encrypted": st.integers(0, 1),
    "extra": st.one_of(st.none(), st.just('{"cached":false}'), st.just("{}")),
    "prev_mac": st.binary(min_size=32, max_size=32),
    "mac": st.binary(min_size=32, max_size=32),
}


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, N), data=st.data())
def test_altered_field_is_named(base_log: Path, k: int, data: st.DataObject) -> None:
    column = data.draw(st.sampled_from(sorted(ALTERATIONS)))
    value = data.draw(ALTERATIONS[column])
    with tempfile.TemporaryDirectory() as d:
        path = copy_log(base_log, Path(d))
        conn = sqlite3.connect(path)
        with conn:
            before = row_dict(conn, k)[column]
            conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, k))
            after = row_dict(conn, k)[column]
        conn.close()
        result = verify(path)
    unchanged = after == before and type(after) is type(before)
    assert result.ok is unchanged
    if not unchanged:
        assert result.first_bad == k, result


def test_delete_middle_record(log_copy: Path) -> None:
    edit(log_copy, "DELETE FROM audit WHERE seq = 3")
    assert verify(log_copy) == VerifyResult(False, 2, 3, "record 3 is missing (seq jumps from 2 to 4)")
    edit(log_copy, "DELETE FROM audit WHERE seq IN (1, 2)")
    assert verify(log_copy) == VerifyResult(False, 0, 1, "records 1-3 are missing (the log starts at 4)")


def test_delete_last_records(log_copy: Path) -> None:
    edit(log_copy, "DELETE FROM audit WHERE seq = ?", (N,))
    assert verify(log_copy) == VerifyResult(
        False, N - 1, N, f"the last record is missing (the anchor says {N}, the log ends at {N - 1})")
    edit(log_copy, "DELETE FROM audit WHERE seq >= 4")
    r = verify(log_copy)
    assert (r.ok, r.first_bad, r.records) == (False, 4, 3) and "the last 3 records are missing" in r.reason
    with AuditLog(log_copy, SECRET) as log, pytest.raises(FormatError, match="anchor says"):
        log.append(entry(9))  # appending would overwrite the anchor and hide the truncation
    edit(log_copy, "DELETE FROM audit")
    assert verify(log_copy).first_bad == 1


def test_swap_records(log_copy: Path) -> None:
    conn = sqlite3.connect(log_copy)
    cols = [d[0] for d in conn.execute("SELECT * FROM audit").description if d[0] != "seq"]
    r2 = conn.execute(f"SELECT {', '.join(cols)} FROM audit WHERE seq = 2").fetchone()
    r5 = conn.execute(f"SELECT {', '.join(cols)} FROM audit WHERE seq = 5").fetchone()
    sets = ", ".join(f"{c} = ?" for c in cols)
    with conn:
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = 2", r5)
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = 5", r2)
    conn.close()
    assert verify(log_copy) == VerifyResult(False, 1, 2, "record 2 was altered (its MAC does not match)")


def test_inserted_records(log_copy: Path, tmp_path: Path) -> None:
    forged = (N + 1, 1.0, None, "/v1/models", None, 0, 0, 200, 1.0, None, None, None, 0, None, b"x" * 32,
              hashlib.sha256(b"forged").digest())
    insert = "INSERT INTO audit VALUES (" + ", ".join("?" * len(forged)) + ")"
    edit(log_copy, insert, forged)
    assert verify(log_copy) == VerifyResult(False, N, N + 1, f"record {N + 1} was altered (its MAC does not match)")
    edit(log_copy, "DELETE FROM audit WHERE seq = ?", (N + 1,))
    edit(log_copy, insert, (0, *forged[1:]))
    assert verify(log_copy).first_bad == 0


def test_text_turned_into_blob(tmp_path: Path) -> None:
    """A BLOB whose base64 equals the TEXT it replaced has the same MAC input; the storage type gives it away."""
    path = tmp_path / "t.db"
    with AuditLog(path, SECRET) as log:
        log.append(entry(1, prompt=base64.b64encode(b"hello").decode()))
        log.append(entry(2))
    edit(path, "UPDATE audit SET prompt = ? WHERE seq = 1", (b"hello",))
    assert verify(path).first_bad == 1


def test_mac_replaced_by_plain_hash(log_copy: Path) -> None:
    conn = sqlite3.connect(log_copy)
    row = row_dict(conn, 4)
    fields = {k: v for k, v in row.items() if k not in ("prev_mac", "mac")}
    with conn:
        conn.execute("UPDATE audit SET route = '/forged', mac = ? WHERE seq = 4",
                     (hashlib.sha256(row["prev_mac"] + _canonical({**fields, "route": "/forged"})).digest(),))
    conn.close()
    assert verify(log_copy).first_bad == 4


def test_wrong_secret(log_copy: Path) -> None:
    r = verify(log_copy, b"another secret, 32 bytes long..")
    assert (r.ok, r.first_bad, r.records) == (False, 1, 0)


def test_anchor(log_copy: Path) -> None:
    anchor = log_copy.with_name(log_copy.name + ".anchor")
    saved = anchor.read_bytes()
    doc = json.loads(saved)
    anchor.write_text(json.dumps({**doc, "seq": doc["seq"] - 1}))
    r = verify(log_copy)
    assert not r.ok and r.first_bad == N + 1 and r.reason.startswith("the anchor file was altered")
    anchor.unlink()
    assert verify(log_copy) == VerifyResult(
        False, N, N + 1, f"anchor file missing: cannot tell whether records after {N} were removed")
    with AuditLog(log_copy, SECRET) as log, pytest.raises(FormatError, match=r"anchor file .* is missing"):
        log.append(entry(9))
    anchor.write_bytes(saved)
    assert verify(log_copy).ok


def test_crash_between_commit_and_anchor(log_copy: Path) -> None:
    """One committed record newer than the anchor is a crash, not tampering; two is not."""
    anchor = log_copy.with_name(log_copy.name + ".anchor")
    old = anchor.read_bytes()
    with AuditLog(log_copy, SECRET) as log:
        log.append(entry(7))
        anchor.write_bytes(old)
        assert log.verify() == VerifyResult(True, N + 1, None, f"chain intact: {N + 1} records")
        assert log.append(entry(8)) == N + 2 and log.verify().ok
        anchor.write_bytes(old)
        assert log.verify().first_bad == N + 2


# --- not an audit log ---

def test_not_a_log(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(FormatError, match=r"junk\.db"):
        AuditLog(junk, SECRET)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    with pytest.raises(FormatError, match="not a ternlm audit log"):
        AuditLog(other, SECRET)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(FormatError, match="schema version 7"):
        AuditLog(other, SECRET)
    with pytest.raises(ParamError):
        AuditLog(tmp_path / "x.db", b"short")
    with pytest.raises(ParamError):
        AuditLog(tmp_path / "x.db", SECRET, content_key=b"k" * 16)


# --- concurrent and killed writers ---

def test_concurrent_instances(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    logs = [AuditLog(path, SECRET), AuditLog(path, SECRET)]
    seqs: list[int] = []

    def work(log: AuditLog) -> None:
        for i in range(30):
            seqs.append(log.append(entry(i)))

    threads = [threading.Thread(target=work, args=(log,)) for log in logs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 121))
    assert logs[0].verify() == VerifyResult(True, 120, None, "chain intact: 120 records")
    for log in logs:
        log.close()


WRITER = """
import sys
sys.path.insert(0, {src!r})
from ternlm.audit import AuditEntry, AuditLog
log = AuditLog({path!r}, {secret!r})
e = AuditEntry("k", "/v1/completions", "tiny", 5, 7, 200, 3.5, "127.0.0.1", prompt="p", completion="c")
for _ in range({count}):
    print(log.append(e), flush=True)
"""


def writer(path: Path, count: int) -> subprocess.Popen:
    code = WRITER.format(src=SRC, path=str(path), secret=SECRET, count=count)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_concurrent_processes(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    procs = [writer(path, 40) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(s) for out in outs for s in out) == list(range(1, 81))
    assert verify(path) == VerifyResult(True, 80, None, "chain intact: 80 records")


def test_sigkill_leaves_verifiable_log(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    for lines in (250, 120, 300):  # each writer picks up after the previous one was killed mid-append
        proc = writer(path, 10**9)
        assert proc.stdout is not None
        last = 0
        for _ in range(lines):
            last = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        r = verify(path)
        assert r.ok, r
        assert r.records >= last


# --- secrets and keys ---

def test_load_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = "TERNLM_TEST_AUDIT_SECRET"
    monkeypatch.delenv(env, raising=False)
    raw = bytes(range(100, 132))
    monkeypatch.setenv(env, raw.hex())
    assert load_secret(None, env=env) == raw
    monkeypatch.setenv(env, base64.b64encode(raw).decode())
    assert load_secret(None, env=env) == raw
    monkeypatch.setenv(env, "correct horse battery staple")
    assert load_secret(None, env=env) == b"correct horse battery staple"
    monkeypatch.setenv(env, "short")
    with pytest.raises(ParamError, match="too short"):
        load_secret(None, env=env)
    monkeypatch.delenv(env)

    f = tmp_path / "secret"
    f.write_text(raw.hex() + "\n")
    assert load_secret(f, env=env) == raw
    f.write_bytes(b"\xff" * 20)  # binary file: the bytes themselves
    assert load_secret(f, env=env) == b"\xff" * 20
    with pytest.raises(ParamError, match="does not exist"):
        load_secret(tmp_path / "nope", env=env, create_at=tmp_path / "gen")
    with pytest.raises(ParamError, match="no audit secret"):
        load_secret(None, env=env)

    gen = tmp_path / "state" / "ternlm" / "audit.secret"
    s1 = load_secret(None, env=env, create_at=gen)
    assert len(s1) == 32 and load_secret(None, env=env, create_at=gen) == s1
    assert stat.S_IMODE(gen.stat().st_mode) == 0o600 and stat.S_IMODE(gen.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in gen.parent.iterdir()) == ["audit.secret"]
    monkeypatch.setenv(env, raw.hex())
    assert load_secret(None, env=env, create_at=gen) == raw  # the env var wins


def test_load_content_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = "TERNLM_TEST_AUDIT_KEY"
    monkeypatch.delenv(env, raising=False)
    assert load_content_key(None, env=env) is None
    monkeypatch.setenv(env, KEY.hex())
    assert load_content_key(None, env=env) == KEY
    monkeypatch.setenv(env, base64.b64encode(KEY).decode())
    assert load_content_key(tmp_path / "ignored", env=env) == KEY
    for bad in (KEY.hex()[:-2], "zz" * 32, base64.b64encode(KEY[:16]).decode(), "not a key"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ParamError, match="must be 32 bytes"):
            load_content_key(None, env=env)
    monkeypatch.delenv(env)
    f = tmp_path / "key"
    f.write_text(base64.urlsafe_b64encode(KEY).decode() + "\n")
    assert load_content_key(f, env=env) == KEY
    with pytest.raises(ParamError, match="does not exist"):
        load_content_key(tmp_path / "nope", env=env)
