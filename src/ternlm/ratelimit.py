"""Per-API-key rate limits (requests and tokens per minute) as token buckets, in-process or shared through Redis.

Each limited dimension is a bucket whose capacity is the per-minute limit; it starts full and refills
continuously at limit/60 per second. A request takes 1 from the request bucket and its token count from
the token bucket, both or neither, so a request refused on tokens does not use up a request slot.

Headers follow OpenAI (`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`). A reset is the time until
the bucket is full again, rounded up to the millisecond and written like Go's `time.Duration`:
"0s", "20ms", "1.5s", "59.999s", "1m0s".
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import redis

from ternlm.errors import ParamError, TernlmError

# A bucket that is idle this long is full again (refill takes 60 s), so its state can be dropped.
_IDLE_S = 120.0
_EPS = 1e-9  # refill arithmetic in floats must not refuse a bucket that is full to within rounding
_SWEEP_EVERY = 4096  # in-process: acquires between sweeps of idle keys


@dataclass(frozen=True)
class Limits:
    """Per-minute limits of one API key; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParamError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass(frozen=True)
class Decision:
    """The outcome of one acquire, with the headers the server adds to its response."""

    allowed: bool
    retry_after: float
    headers: dict[str, str]
    reason: str = ""


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers (Go style), rounded up to the millisecond."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{secs}" if minutes else secs


def _refill(level: float, stamp: float, now: float, cap: int) -> float:
    return min(float(cap), level + max(0.0, now - stamp) * cap / 60.0)


def _dimension_headers(name: str, cap: int, level: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{name}": str(cap),
        f"x-ratelimit-remaining-{name}": str(max(0, math.floor(level + _EPS))),
        f"x-ratelimit-reset-{name}": format_duration((cap - level) * 60.0 / cap),
    }


def _decide(limits: Limits, tokens: int, allowed: bool, req_level: float, tok_level: float) -> Decision:
    """Build the Decision from the bucket levels left after the acquire (shared by both limiters)."""
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers.update(_dimension_headers("requests", limits.rpm, req_level))
    if limits.tpm is not None:
        headers.update(_dimension_headers("tokens", limits.tpm, tok_level))
    if allowed:
        return Decision(True, 0.0, headers)
    if limits.tpm is not None and tokens > limits.tpm:
        return Decision(False, 0.0, headers, f"request of {tokens} tokens is larger than the rate limit of "
                                             f"{limits.tpm} tokens per minute")
    waits: list[tuple[float, str]] = []
    if limits.rpm is not None and req_level + _EPS < 1:
        waits.append(((1 - req_level) * 60.0 / limits.rpm, f"rate limit of {limits.rpm} requests per minute reached"))
    if limits.tpm is not None and tok_level + _EPS < tokens:
        waits.append(((tokens - tok_level) * 60.0 / limits.tpm,
                      f"rate limit of {limits.tpm} tokens per minute reached "
                      f"(requested {tokens}, {max(0, math.floor(tok_level + _EPS))} left)"))
    retry_after = max((w for w, _ in waits), default=0.0)
    headers["Retry-After"] = str(max(1, math.ceil(retry_after - 1e-6)))
    return Decision(False, retry_after, headers, "; ".join(r for _, r in waits))


def _check_tokens(tokens: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ParamError(f"tokens must be a non-negative integer, got {tokens!r}")


class RateLimiter:
    """In-process token buckets per key, guarded by one lock; the default when there is no Redis."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        # key -> [req_level, req_stamp, tok_level, tok_stamp]; an absent dimension reads as a full bucket.
        self._state: dict[str, list[float]] = {}
        self._since_sweep = 0

    def acquire(self, key: str, limits: Limits, tokens: int) -> Decision:
        """Take one request and `tokens` tokens from `key`'s buckets, both or neither."""
        _check_tokens(tokens)
        if limits.rpm is None and limits.tpm is None:
            return Decision(True, 0.0, {})
        allowed, req_level, tok_level = self._take(key, limits, tokens)
        return _decide(limits, tokens, allowed, req_level, tok_level)

    def refund(self, key: str, limits: Limits, tokens: int) -> None:
        """Give back tokens reserved by acquire but not used; the bucket never goes above its capacity."""
        _check_tokens(tokens)
        if limits.tpm is not None and tokens > 0:
            self._give(key, limits.tpm, tokens)

    def _take(self, key: str, limits: Limits, tokens: int) -> tuple[bool, float, float]:
        with self._lock:
            now = self._clock()
            self._maybe_sweep(now)
            st = self._state.get(key)
            if st is None:
                st = self._state[key] = [math.inf, now, math.inf, now]
            req = _refill(st[0], st[1], now, limits.rpm) if limits.rpm is not None else math.inf
            tok = _refill(st[2], st[3], now, limits.tpm) if limits.tpm is not None else math.inf
            allowed = req + _EPS >= 1 and tok + _EPS >= tokens
            if allowed:
                req = max(0.0, req - 1)
                tok = max(0.0, tok - tokens)
            st[:] = [req, now, tok, now]
            return allowed, req, tok

    def _give(self, key: str, tpm: int, tokens: int) -> None:
        with self._lock:
            st = self._state.get(key)
            if st is None:  # never seen or swept: the bucket is full
                return
            now = self._clock()
            st[2] = min(float(tpm), _refill(st[2], st[3], now, tpm) + tokens)
            st[3] = now

    def _maybe_sweep(self, now: float) -> None:
        """Drop keys idle long enough to be full again, so a stream of one-off keys cannot grow memory."""
        self._since_sweep += 1
        if self._since_sweep < _SWEEP_EVERY:
            return
        self._since_sweep = 0
        for k in [k for k, st in self._state.items() if now - max(st[1], st[3]) > _IDLE_S]:
            del self._state[k]


# KEYS[1]: the key's hash. ARGV: rpm, tpm (0 = unlimited), tokens, mode ("acquire" | "refund"), expiry in ms.
# Fields r/rt and t/tt hold each bucket's level and the Redis TIME it was last brought up to date.
# Returns {allowed, request level, token level} as strings (Lua numbers would be truncated to integers).
_LUA = """
local rpm, tpm, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local st = redis.call('HMGET', KEYS[1], 'r', 'rt', 't', 'tt')
local function level(cap, lv, stamp)
  if cap == 0 then return -1 end
  if lv == false then return cap end
  local elapsed = now - tonumber(stamp)
  if elapsed < 0 then elapsed = 0 end
  return math.min(cap, tonumber(lv) + elapsed * cap / 60)
end
local req = level(rpm, st[1], st[2])
local tok = level(tpm, st[3], st[4])
local function fmt(x) return string.format('%.17g', x) end
if ARGV[4] == 'refund' then
  if tpm > 0 and st[3] ~= false then
    redis.call('HSET', KEYS[1], 't', fmt(math.min(tpm, tok + need)), 'tt', fmt(now))
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
  end
  return {'1', fmt(req), fmt(tok)}
end
local eps = 1e-9
local allowed = (rpm == 0 or req + eps >= 1) and (tpm == 0 or tok + eps >= need)
if allowed then
  if rpm > 0 then req = math.max(0, req - 1) end
  if tpm > 0 then tok = math.max(0, tok - need) end
end
if rpm > 0 then redis.call('HSET', KEYS[1], 'r', fmt(req), 'rt', fmt(now)) end
if tpm > 0 then redis.call('HSET', KEYS[1], 't', fmt(tok), 'tt', fmt(now)) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {allowed and '1' or '0', fmt(req), fmt(tok)}
"""


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisRateLimiter(RateLimiter):
    """The same buckets kept in Redis, so every server process sharing it draws on one budget per key.

    Each operation is one Lua script run atomically in Redis, timed by Redis's own clock so that processes
    on machines with skewed clocks agree. Keys expire after two idle minutes (a bucket is full again by then).
    API keys are stored hashed: the Redis key names are not the secrets.
    """

    def __init__(self, url: str, prefix: str = "ternlm:rl:") -> None:
        super().__init__()
        self._url = redact_url(url)
        self._prefix = prefix
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        except ValueError as e:
            raise TernlmError(f"bad Redis URL {self._url!r}: {e}") from e
        self._script = self._redis.register_script(_LUA)
        self._call(self._redis.ping)

    def _call(self, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise TernlmError(f"cannot reach Redis at {self._url}: {e}") from e
        except redis.RedisError as e:
            raise TernlmError(f"Redis at {self._url} failed a rate-limit update: {e}") from e

    def _run(self, key: str, limits: Limits, tokens: int, mode: str) -> list[bytes]:
        name = self._prefix + hashlib.sha256(key.encode()).hexdigest()
        args = [limits.rpm or 0, limits.tpm or 0, tokens, mode, int(_IDLE_S * 1000)]
        return cast("list[bytes]", self._call(self._script, keys=[name], args=args))

    def _take(self, key: str, limits: Limits, tokens: int) -> tuple[bool, float, float]:
        allowed, req, tok = self._run(key, limits, tokens, "acquire")
        return allowed == b"1", float(req), float(tok)

    def _give(self, key: str, tpm: int, tokens: int) -> None:
        self._run(key, Limits(tpm=tpm), tokens, "refund")


def make_limiter(redis_url: str | None) -> RateLimiter:
    """The limiter the server uses: shared through Redis when a URL is given, else in-process."""
    return RedisRateLimiter(redis_url) if redis_url else RateLimiter()
