"""Cache of whole responses to identical deterministic requests, in-process (LRU) or shared through Redis.

Only requests whose output is fixed by their body are cached: greedy (temperature 0) or seeded sampling,
one choice, no streaming. A Redis cache is an optimisation, never a dependency: when Redis fails, the
request runs as on a miss and the failure is logged (at most once a minute).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import redis

from ternlm.errors import ParamError
from ternlm.ratelimit import redact_url

log = logging.getLogger("ternlm.cache")

# Fields that do not change the output, left out of the key so that they do not split the cache.
_IGNORED_FIELDS = frozenset({"user"})
_WARN_EVERY_S = 60.0


def cache_key(route: str, model: str, body: dict[str, Any]) -> str | None:
    """sha256 hex of the canonical JSON of the request, or None when its output is not fixed by its body.

    Cacheable iff (temperature == 0 or a non-null seed) and not streaming and n is 1 (absent or null counts
    as 1). OpenAI's default temperature is 1, so a request with neither temperature nor seed is not cacheable.
    """
    temperature = body.get("temperature")
    greedy = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
    if not (greedy or body.get("seed") is not None):
        return None
    if body.get("stream") or body.get("n") not in (None, 1):
        return None
    kept = {k: v for k, v in body.items() if k not in _IGNORED_FIELDS}
    try:
        text = json.dumps({"route": route, "model": model, "body": kept}, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # not plain JSON (or NaN): no canonical form, so no key
        return None
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """In-process LRU of response bodies, thread-safe; entries optionally expire `ttl` seconds after put."""

    def __init__(self, max_entries: int = 1024, ttl: float | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        if max_entries < 1:
            raise ParamError(f"max_entries must be at least 1, got {max_entries}")
        if ttl is not None and ttl <= 0:
            raise ParamError(f"ttl must be positive or None, got {ttl}")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires at, value)

    def get(self, key: str) -> bytes | None:
        """The cached value, or None on a miss or an expired entry."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: str, value: bytes) -> None:
        """Store `value`, evicting the least recently used entries beyond max_entries."""
        with self._lock:
            expires = self._clock() + self.ttl if self.ttl is not None else float("inf")
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class RedisResponseCache(ResponseCache):
    """Response cache in Redis, shared by every server process using it; Redis's maxmemory policy bounds it."""

    def __init__(self, url: str, ttl: float | None = 3600.0, prefix: str = "ternlm:rc:") -> None:
        if ttl is not None and ttl <= 0:
            raise ParamError(f"ttl must be positive or None, got {ttl}")
        self.ttl = ttl
        self._url = redact_url(url)
        self._prefix = prefix
        self._last_warning: float | None = None
        self._warn_lock = threading.Lock()
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        except ValueError as e:
            raise ParamError(f"bad Redis URL {self._url!r}: {e}") from e

    def get(self, key: str) -> bytes | None:
        """The cached value, or None on a miss or when Redis cannot be reached."""
        try:
            return cast("bytes | None", self._redis.get(self._prefix + key))
        except redis.RedisError as e:
            self._warn("get", e)
            return None

    def put(self, key: str, value: bytes) -> None:
        """Store `value` with the cache's ttl; skipped (with a warning) when Redis cannot be reached."""
        try:
            px = None if self.ttl is None else max(1, round(self.ttl * 1000))
            self._redis.set(self._prefix + key, value, px=px)
        except redis.RedisError as e:
            self._warn("put", e)

    def _warn(self, op: str, exc: Exception) -> None:
        """Log a Redis failure, at most once a minute: a Redis outage must not flood the log."""
        now = time.monotonic()
        with self._warn_lock:
            if self._last_warning is not None and now - self._last_warning < _WARN_EVERY_S:
                return
            self._last_warning = now
        log.warning("response cache: Redis at %s failed a %s (%s); serving without the cache", self._url, op, exc)


def make_cache(max_entries: int, redis_url: str | None, ttl: float | None = None) -> ResponseCache | None:
    """The server's response cache: Redis when a URL is given (max_entries is then unused, ttl defaults to
    one hour), else an in-process LRU; None when max_entries is 0 and there is no Redis."""
    if redis_url:
        return RedisResponseCache(redis_url) if ttl is None else RedisResponseCache(redis_url, ttl=ttl)
    if max_entries < 0:
        raise ParamError(f"max_entries must be 0 (no cache) or more, got {max_entries}")
    return ResponseCache(max_entries, ttl) if max_entries else None
