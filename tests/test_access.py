"""The server's on-premise controls, in process: API keys and roles, quotas and rate limits, the audit
record of every request, the PII filter, the response cache and the security headers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import ternlm
from ternlm.access import AccessConfig, Guard, Principal
from ternlm.audit import open_log
from ternlm.keys import KeyStore
from ternlm.metrics import Metrics
from ternlm.server import ServerConfig, create_app
from tiny_models import toy_model_path

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
        "ignore_eos": True}
COMPLETION = {"model": "default", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True}

# Every route, with the request that exercises it and the roles that may call it. None: public.
ROUTES: list[tuple[str, str, dict | None, set[str] | None]] = [
    ("GET", "/health", None, None),
    ("GET", "/ready", None, None),
    ("GET", "/", None, None),
    ("GET", "/metrics", None, {"metrics", "admin"}),
    ("GET", "/v1/models", None, {"user", "admin"}),
    ("GET", "/v1/models/default", None, {"user", "admin"}),
    ("POST", "/v1/chat/completions", CHAT, {"user", "admin"}),
    ("POST", "/v1/completions", COMPLETION, {"user", "admin"}),
    ("POST", "/tokenize", {"content": "hello"}, {"user", "admin"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}, {"user", "admin"}),
    ("GET", "/admin/keys", None, {"admin"}),
    ("POST", "/admin/keys", {"name": "made-by-admin", "role": "user"}, {"admin"}),
]


@pytest.fixture(scope="module")
def model() -> ternlm.Model:
    return ternlm.load(toy_model_path())


def serve(model: ternlm.Model, **access: object) -> Iterator[TestClient]:
    app = create_app(model, ServerConfig(slots=2, access=AccessConfig(**access)))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def keys_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("keys") / "keys.db"
    store = KeyStore(path)
    keys = {role: store.create(f"{role}-key", role)[0] for role in ("user", "metrics", "admin")}
    store.close()
    return path, keys


@pytest.fixture(scope="module")
def secured(model: ternlm.Model, keys_db: tuple[Path, dict[str, str]],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    audit_db = tmp_path_factory.mktemp("audit") / "audit.db"
    yield from serve(model, keys_db=keys_db[0], audit_db=audit_db, audit_content=True, response_cache=0)


def _call(client: TestClient, method: str, path: str, body: dict | None, headers: dict[str, str]) -> int:
    return client.request(method, path, json=body, headers=headers).status_code


@pytest.mark.parametrize(("method", "path", "body", "roles"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_auth_matrix(secured: TestClient, keys_db: tuple[Path, dict[str, str]], method: str, path: str,
                     body: dict | None, roles: set[str] | None) -> None:
    keys = keys_db[1]
    callers = {"no key": {}, "bad key": {"Authorization": "Bearer tlm-000000000000-wrong"},
               **{role: {"Authorization": f"Bearer {key}"} for role, key in keys.items()}}
    for caller, headers in callers.items():
        if body is not None and path == "/admin/keys":
            body = {**body, "name": f"made-by-{caller.replace(' ', '-')}"}
        status = _call(secured, method, path, body, headers)
        if roles is None:
            expected = {200}
        elif caller in ("no key", "bad key"):
            expected = {401}
        else:
            expected = {200, 201} if caller in roles else {403}
        assert status in expected, f"{caller}: {method} {path} gave {status}, expected {expected}"


def test_x_api_key_header_and_unknown_route(secured: TestClient, keys_db: tuple[Path, dict[str, str]]) -> None:
    user = keys_db[1]["user"]
    assert secured.get("/v1/models", headers={"X-Api-Key": user}).status_code == 200
    assert secured.get("/nope").status_code == 401  # no key reveals nothing, not even which routes exist
    assert secured.get("/nope", headers={"X-Api-Key": user}).status_code == 404
    r = secured.get("/v1/models")
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_admin_api_manages_keys(secured: TestClient, keys_db: tuple[Path, dict[str, str]]) -> None:
    admin = {"Authorization": f"Bearer {keys_db[1]['admin']}"}
    made = secured.post("/admin/keys", json={"name": "temp", "role": "user", "rpm": 5}, headers=admin)
    assert made.status_code == 201 and made.json()["rpm"] == 5
    new = {"Authorization": f"Bearer {made.json()['key']}"}
    assert secured.get("/v1/models", headers=new).status_code == 200
    listed = secured.get("/admin/keys", headers=admin).json()["data"]
    assert "temp" in [k["name"] for k in listed] and all("key" not in k for k in listed)
    assert secured.patch("/admin/keys/temp", json={"rpm": 9}, headers=admin).json()["rpm"] == 9
    assert secured.delete("/admin/keys/temp", headers=admin).json()["revoked"] is True
    assert secured.get("/v1/models", headers=new).status_code == 401  # revocation holds at once
    assert secured.post("/admin/keys", json={"name": "x", "role": "root"}, headers=admin).status_code == 400


def test_every_request_is_audited_and_the_chain_verifies(secured: TestClient,
                                                         keys_db: tuple[Path, dict[str, str]]) -> None:
    log_path = secured.app.state.guard.cfg.audit_db
    before = sum(1 for _ in open_log(log_path).records())
    user = {"Authorization": f"Bearer {keys_db[1]['user']}"}
    assert secured.post("/v1/chat/completions", json=CHAT, headers=user).status_code == 200
    with secured.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}, headers=user) as r:
        streamed = "".join(r.iter_text())
    assert secured.get("/metrics").status_code == 401
    log = open_log(log_path)
    records = list(log.records())[before:]
    assert [(r["route"], r["status"], r["key_name"]) for r in records] == [
        ("/v1/chat/completions", 200, "user-key"), ("/v1/completions", 200, "user-key"), ("/metrics", 401, None)]
    chat, stream = records[0], records[1]
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] == 2 and chat["model"] == "default"
    assert json.loads(chat["prompt"])[0]["content"] == "Hi"
    assert stream["completion_tokens"] == 2 and stream["completion"] in streamed.replace("\\", "")
    assert log.verify().ok


def test_quotas_and_rate_limits(model: ternlm.Model, tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    limited = store.create("limited", "user", rpm=2, max_tokens=4, max_prompt_tokens=50)[0]
    store.close()
    for client in serve(model, keys_db=tmp_path / "keys.db"):
        auth = {"Authorization": f"Bearer {limited}"}
        too_long = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5}, headers=auth)
        assert too_long.status_code == 429 and too_long.json()["error"]["code"] == "quota_exceeded"
        long_prompt = client.post("/v1/completions", json={**COMPLETION, "prompt": "word " * 60}, headers=auth)
        assert long_prompt.status_code == 429
        first = client.post("/v1/completions", json=COMPLETION, headers=auth)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert client.post("/v1/completions", json=COMPLETION, headers=auth).status_code == 200
        third = client.post("/v1/completions", json=COMPLETION, headers=auth)
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(third.headers["retry-after"]) <= 31
        assert third.headers["x-ratelimit-remaining-requests"] == "0"


def test_token_budget_is_reserved_then_refunded() -> None:
    # prompt + max_tokens is reserved when the request starts; what it did not use comes back when it ends
    guard = Guard(AccessConfig(keys_db=Path("/nonexistent/keys.db"), default_tpm=400, response_cache=0), Metrics())
    who, headers = Principal(None, "192.0.2.1"), {}

    async def scenario() -> None:
        first = await guard.admit(who, 10, 100, 1000, headers)
        assert (first.tokens, first.max_tokens) == (110, 100)
        assert int(headers["x-ratelimit-remaining-tokens"]) == 290
        await guard.release(first, 30)  # stopped early: 80 of the 110 come back
        await guard.admit(who, 10, 10, 1000, headers)
        assert 350 <= int(headers["x-ratelimit-remaining-tokens"]) <= 351  # 290 + 80 - 20, plus any refill

    asyncio.run(scenario())


def test_request_larger_than_a_minute_of_tokens_is_refused(model: ternlm.Model) -> None:
    for client in serve(model, default_tpm=400):
        assert client.post("/v1/completions", json={**COMPLETION, "max_tokens": 100}).status_code == 200
        huge = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 500})
        assert huge.status_code == 429 and "retry-after" not in huge.headers  # can never fit a minute's budget


def test_response_cache_serves_identical_deterministic_requests(model: ternlm.Model) -> None:
    for client in serve(model, response_cache=16):
        first = client.post("/v1/completions", json=COMPLETION)
        second = client.post("/v1/completions", json=COMPLETION)
        assert second.headers.get("x-ternlm-cache") == "hit" and "x-ternlm-cache" not in first.headers
        assert second.json()["choices"] == first.json()["choices"]
        sampled = {**COMPLETION, "temperature": 0.7}
        client.post("/v1/completions", json=sampled)
        assert "x-ternlm-cache" not in client.post("/v1/completions", json=sampled).headers
        metrics = client.get("/metrics").text
        assert 'ternlm_response_cache_total{result="hit"} 1.0' in metrics


EMAIL_SCHEMA = {"type": "json_schema", "json_schema": {"name": "contact", "schema": {
    "type": "object", "properties": {"email": {"const": "alice.smith@example.com"}}, "required": ["email"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_pii_filter_masks_answers(model: ternlm.Model, stream: bool) -> None:
    # The grammar forces the random model to write an e-mail address; the filter must mask it.
    body = {**CHAT, "max_tokens": 300, "temperature": 0.7, "seed": 2, "response_format": EMAIL_SCHEMA,
            "stream": stream}
    for client in serve(model, pii_filter="output"):
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        else:
            text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert json.loads(text) == {"email": "[EMAIL]"}
        assert 'ternlm_pii_masked_total{direction="output",kind="email"} 1.0' in client.get("/metrics").text
        assert client.post("/v1/chat/completions", json={**CHAT, "logprobs": True}).status_code == 400


def test_pii_filter_masks_prompts_before_the_model(model: ternlm.Model) -> None:
    for client in serve(model, pii_filter="both"):
        r = client.post("/v1/completions", json={**COMPLETION, "prompt": "mail bob@example.org now", "echo": True})
        assert r.json()["choices"][0]["text"].startswith("mail [EMAIL] now")


def test_security_headers_and_page_policy(model: ternlm.Model) -> None:
    for client in serve(model, cors_origins=("https://intranet.example",)):
        page = client.get("/")
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": "https://intranet.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://intranet.example"
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_auth_turns_on_when_the_first_key_is_created(model: ternlm.Model, tmp_path: Path) -> None:
    for client in serve(model, keys_db=tmp_path / "keys.db"):
        assert client.get("/v1/models").status_code == 200
        assert client.get("/admin/keys").status_code == 403  # the admin API never runs without auth
        key = KeyStore(tmp_path / "keys.db").create("first", "user")[0]  # as `ternlm keys create` would
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_require_auth_without_keys_refuses_everything_but_health(model: ternlm.Model, tmp_path: Path) -> None:
    for client in serve(model, keys_db=tmp_path / "none.db", require_auth=True):
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_key_max_tokens_caps_requests_that_do_not_say(model: ternlm.Model, tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key = store.create("capped", "user", max_tokens=3)[0]
    store.close()
    for client in serve(model, keys_db=tmp_path / "keys.db"):
        body = {k: v for k, v in COMPLETION.items() if k != "max_tokens"}
        r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
