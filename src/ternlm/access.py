"""Who may call the server, how much, and the record of what they did.

`Guard` holds the on-premise controls the server consults: API keys and roles (keys.py), per-key rate limits
and quotas (ratelimit.py), the tamper-evident audit log (audit.py), the PII filter (pii.py) and the response
cache (cache.py). `AccessMiddleware` applies the parts that concern every request — authentication, role
checks, security and rate-limit headers, one audit record per request written before the response ends — and
the route handlers ask the Guard for the parts that need the request's tokens (limits, PII, cache).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ternlm.audit import AuditEntry, AuditLog, open_log
from ternlm.cache import make_cache
from ternlm.errors import TernlmError
from ternlm.keys import ROLES, KeyRecord, KeyStore
from ternlm.metrics import Metrics
from ternlm.paths import home
from ternlm.pii import PIIFilter, StreamMasker, load_detectors
from ternlm.protocol import APIError, error_body
from ternlm.ratelimit import Limits, make_limiter

log = logging.getLogger("ternlm.access")

PUBLIC_PATHS = frozenset({"/health", "/ready", "/"})  # "/" is the static chat page; its API calls need a key
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PII_MODES = ("off", "output", "both")
# Sent with every response; the chat page also gets a Content-Security-Policy built from its own scripts.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store"}


@dataclass
class AccessConfig:
    """The on-premise switches of `ternlm serve`; everything is off (or in-process) by default."""

    keys_db: Path = field(default_factory=lambda: home() / "keys.db")
    require_auth: bool = False  # auth is also on as soon as the keys database holds an active key
    redis_url: str | None = None  # shares rate limits and the response cache between server processes
    default_rpm: int | None = None  # limits for keys without their own (and for anonymous clients, per address)
    default_tpm: int | None = None
    audit_db: Path | None = None  # None: no audit log
    audit_content: bool = False  # also record prompt and completion text
    audit_secret_file: Path | None = None  # None: <audit_db>.secret, created on first use
    audit_key_file: Path | None = None  # AES-256-GCM key for the content fields (or TERNLM_AUDIT_KEY)
    pii_filter: str = "off"  # "output" masks answers, "both" also masks prompts before the model sees them
    pii_detectors: Path | None = None  # a TOML file of detectors replacing the shipped ones
    response_cache: int = 1024  # entries of the deterministic-response cache; 0 turns it off
    cors_origins: tuple[str, ...] = ()


def role_allows(role: str, path: str) -> bool:
    """admin may call everything, metrics only /metrics, user the model routes (not /metrics, not /admin)."""
    if role == "admin":
        return True
    if path == "/metrics":
        return role == "metrics"
    return role == "user" and not path.startswith("/admin")


@dataclass
class Principal:
    """The caller of one request: an API key, or an anonymous client (auth off) known by its address."""

    key: KeyRecord | None
    client: str

    @property
    def name(self) -> str | None:
        return self.key.name if self.key else None

    @property
    def bucket(self) -> str:
        return f"key:{self.key.id}" if self.key else f"addr:{self.client}"


@dataclass
class Reservation:
    """Tokens held from a caller's per-minute budget until the request ends and the unused part returns."""

    bucket: str
    limits: Limits
    tokens: int
    max_tokens: int  # the completion limit to run with: the request's, else the key's cap or what the context leaves


@dataclass
class RequestRecord:
    """What a handler tells the audit log about its request (usage, and content when that is recorded)."""

    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt: str | None = None
    completion: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Guard:
    """The controls of one server process, built from its AccessConfig."""

    def __init__(self, cfg: AccessConfig, metrics: Metrics) -> None:
        if cfg.pii_filter not in PII_MODES:
            raise TernlmError(f"pii_filter must be one of {', '.join(PII_MODES)}, not {cfg.pii_filter!r}")
        self.cfg, self.metrics = cfg, metrics
        self._keys: KeyStore | None = None
        self.limiter = make_limiter(cfg.redis_url)
        self.cache = make_cache(cfg.response_cache, cfg.redis_url)
        self.pii = PIIFilter(load_detectors(cfg.pii_detectors)) if cfg.pii_filter != "off" else None
        self.audit: AuditLog | None = None
        if cfg.audit_db is not None:
            self.audit = open_log(cfg.audit_db, cfg.audit_secret_file, cfg.audit_key_file, create=True)
        if cfg.require_auth and not self.auth_on_keys():
            log.warning("--require-auth is on but %s holds no active key: every request will get 401; "
                        "create one with `ternlm keys create`", cfg.keys_db)

    # -- keys --------------------------------------------------------------------------------------------------

    @property
    def keys(self) -> KeyStore | None:
        """The key store, opened once its file exists (`ternlm keys create` may make it while we run)."""
        if self._keys is None and self.cfg.keys_db.exists():
            self._keys = KeyStore(self.cfg.keys_db)
        return self._keys

    def auth_on_keys(self) -> bool:
        return self.keys is not None and self.keys.any_active()

    def auth_on(self) -> bool:
        return self.cfg.require_auth or self.auth_on_keys()

    def authenticate(self, headers: dict[str, str], path: str, client: str) -> Principal:
        """The caller, or APIError 401 (no or unknown key) / 403 (a key whose role may not call `path`)."""
        if path in PUBLIC_PATHS or not self.auth_on():
            if path.startswith("/admin"):
                raise APIError(403, "the admin API needs auth on: create an admin key with `ternlm keys create "
                                    "--role admin`", "permission_denied", "permission_denied")
            return Principal(None, client)
        presented = _presented_key(headers)
        if presented is None:
            self.metrics.auth_failures.labels("missing").inc()
            raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY' or 'X-Api-Key'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        record = self.keys.verify(presented) if self.keys is not None else None
        if record is None:
            self.metrics.auth_failures.labels("invalid").inc()
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not role_allows(record.role, path):
            self.metrics.auth_failures.labels("forbidden").inc()
            raise APIError(403, f"the key '{record.name}' has role '{record.role}', which may not call {path}",
                           "permission_denied", "permission_denied")
        return Principal(record, client)

    # -- limits ------------------------------------------------------------------------------------------------

    def limits(self, who: Principal) -> Limits:
        key = who.key
        return Limits(rpm=key.rpm if key and key.rpm is not None else self.cfg.default_rpm,
                      tpm=key.tpm if key and key.tpm is not None else self.cfg.default_tpm)

    async def admit(self, who: Principal, prompt_tokens: int, max_tokens: int | None, context_left: int,
                    headers: dict[str, str]) -> Reservation:
        """Check the key's quotas and take one request plus the tokens it may use from its budget;
        APIError 429 when over. The rate-limit headers are written into `headers` either way."""
        key = who.key
        if key and key.max_prompt_tokens is not None and prompt_tokens > key.max_prompt_tokens:
            raise APIError(429, f"the prompt has {prompt_tokens} tokens; the key '{key.name}' allows at most "
                                f"{key.max_prompt_tokens}", "rate_limit_exceeded", "quota_exceeded")
        if key and key.max_tokens is not None and max_tokens is not None and max_tokens > key.max_tokens:
            raise APIError(429, f"max_tokens {max_tokens} exceeds the key's limit of {key.max_tokens}",
                           "rate_limit_exceeded", "quota_exceeded")
        cap = min(x for x in (key.max_tokens if key else None, context_left) if x is not None)
        completion = min(max_tokens, cap) if max_tokens is not None else cap
        limits = self.limits(who)
        tokens = prompt_tokens + completion
        decision = await self._call(self.limiter.acquire, who.bucket, limits, tokens)
        headers.update(decision.headers)
        if not decision.allowed:
            self.metrics.rate_limited.inc()
            raise APIError(429, decision.reason or "rate limit reached", "rate_limit_exceeded",
                           "rate_limit_exceeded", decision.headers)
        return Reservation(who.bucket, limits, tokens, max_tokens if max_tokens is not None else cap)

    async def release(self, reservation: Reservation, used_tokens: int) -> None:
        """Give back what the request reserved but did not use."""
        unused = reservation.tokens - used_tokens
        if unused > 0:
            await self._call(self.limiter.refund, reservation.bucket, reservation.limits, unused)

    async def _call(self, fn: Callable, *args: Any) -> Any:
        # Redis answers over the network: keep it off the event loop. The in-process limiter is a dict lookup.
        if not self.cfg.redis_url:
            return fn(*args)
        try:
            return await asyncio.to_thread(fn, *args)
        except TernlmError as e:  # limits that cannot be checked are not waived: refuse until Redis is back
            raise APIError(503, f"rate limiter unavailable: {e}", "server_error", "rate_limiter_unavailable",
                           {"Retry-After": "5"}) from e

    # -- PII -----------------------------------------------------------------------------------------------------

    def mask_input(self, text: str) -> str:
        if self.pii is None or self.cfg.pii_filter != "both":
            return text
        masked, counts = self.pii.mask(text)
        self.count_pii(counts, "input")
        return masked

    def mask_output(self, text: str) -> str:
        if self.pii is None:
            return text
        masked, counts = self.pii.mask(text)
        self.count_pii(counts, "output")
        return masked

    def output_masker(self) -> StreamMasker | None:
        return self.pii.stream() if self.pii is not None else None

    def count_pii(self, counts: dict[str, int], direction: str) -> None:
        for kind, n in counts.items():
            if n:
                self.metrics.pii_masked.labels(kind, direction).inc(n)

    # -- response cache ----------------------------------------------------------------------------------------

    async def cached(self, key: str | None) -> bytes | None:
        if self.cache is None or key is None:
            return None
        body = await self._call(self.cache.get, key)
        self.metrics.response_cache.labels("hit" if body is not None else "miss").inc()
        return body

    async def remember(self, key: str | None, body: bytes) -> None:
        if self.cache is not None and key is not None:
            await self._call(self.cache.put, key, body)

    # -- audit ---------------------------------------------------------------------------------------------------

    async def record(self, who: Principal | None, path: str, client: str, status: int, latency: float,
                     rec: RequestRecord) -> None:
        if self.audit is None:
            return
        content = self.cfg.audit_content
        entry = AuditEntry(key_name=who.name if who else None, route=path, model=rec.model,
                           prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens, status=status,
                           latency_ms=latency * 1000.0, client=client,
                           prompt=rec.prompt if content else None, completion=rec.completion if content else None,
                           extra=rec.extra or None)
        await asyncio.to_thread(self.audit.append, entry)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
        if self._keys is not None:
            self._keys.close()


def _presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def page_csp(html: str) -> str:
    """A Content-Security-Policy for the chat page allowing exactly its own inline script and style."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks)
        return " ".join(f"'sha256-{d}'" for d in digests)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


# -- the middleware -------------------------------------------------------------------------------------------

class AccessMiddleware:
    """Authenticates each request, adds security and rate-limit headers, and appends its audit record before
    the last byte of the response goes out (or when the client goes away first)."""

    def __init__(self, app: Callable, guard: Guard, page_csp: str | None = None) -> None:
        self.app, self.guard, self.page_csp = app, guard, page_csp

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        client = f"{scope['client'][0]}" if scope.get("client") else "unknown"
        rec, headers = RequestRecord(), {}
        state = scope.setdefault("state", {})
        state["ternlm_record"], state["ternlm_headers"] = rec, headers
        status, recorded, who = [500], [False], None

        async def record() -> None:
            if not recorded[0]:
                recorded[0] = True
                # A client that hangs up cancels the response; the record must be written all the same.
                with anyio.CancelScope(shield=True):
                    await self.guard.record(who, path, client, status[0], time.perf_counter() - start, rec)

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                extra = {**SECURITY_HEADERS, **headers}
                if path == "/" and self.page_csp:
                    extra["Content-Security-Policy"] = self.page_csp
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.lower().encode(), v.encode()) for k, v in extra.items()
                                                    if k.lower().encode() not in present)]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await record()  # durable before the response completes
            await send(message)

        try:
            headers_in = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                who = self.guard.authenticate(headers_in, path, client)
            except APIError as e:
                response = JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status,
                                        headers=e.headers)
                await response(scope, receive, guarded_send)
                return
            state["ternlm_principal"] = who
            await self.app(scope, receive, guarded_send)
        finally:
            if not recorded[0]:
                rec.extra.setdefault("incomplete", True)  # the client left, or the app failed mid-response
                await record()


def principal(request: Request) -> Principal:
    return request.state.ternlm_principal


def request_record(request: Request) -> RequestRecord:
    return request.state.ternlm_record


def response_headers(request: Request) -> dict[str, str]:
    return request.state.ternlm_headers


# -- the admin API --------------------------------------------------------------------------------------------

def add_admin_routes(app: FastAPI, guard: Guard, read_json: Callable) -> None:
    """/admin/keys: list, create, change limits of and revoke API keys (the middleware admits only admins)."""
    limit_fields = ("rpm", "tpm", "max_tokens", "max_prompt_tokens")

    def store() -> KeyStore:
        if guard.keys is None:  # unreachable with auth on, which /admin requires; kept for a clear message
            raise APIError(503, "no key store", "server_error")
        return guard.keys

    def limits_of(body: dict[str, Any]) -> dict[str, int | None]:
        bad = [k for k in body if k not in (*limit_fields, "name", "role")]
        if bad:
            raise APIError(400, f"unknown fields {bad}; known: name, role, {', '.join(limit_fields)}")
        return {k: body[k] for k in limit_fields if k in body}

    @app.get("/admin/keys")
    async def list_keys(request: Request) -> JSONResponse:
        include = request.query_params.get("include_revoked", "false").lower() in ("1", "true", "yes")
        return JSONResponse({"object": "list", "data": [k.public() for k in store().list(include_revoked=include)]})

    @app.post("/admin/keys")
    async def create_key(request: Request) -> JSONResponse:
        body = await read_json(request)
        name, role = body.get("name"), body.get("role", "user")
        if not isinstance(name, str) or role not in ROLES:
            raise APIError(400, f"give a string 'name' and a 'role' in {', '.join(ROLES)}")
        key, record = store().create(name, role, **limits_of(body))
        return JSONResponse({**record.public(), "key": key}, status_code=201)

    @app.patch("/admin/keys/{name}")
    async def update_key(name: str, request: Request) -> JSONResponse:
        return JSONResponse(store().set_limits(name, **limits_of(await read_json(request))).public())

    @app.delete("/admin/keys/{name}")
    async def revoke_key(name: str) -> JSONResponse:
        return JSONResponse(store().revoke(name).public())
