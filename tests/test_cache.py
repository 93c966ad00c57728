"""Response cache: which requests get a key, the in-process LRU, and the Redis cache (shared, and failing soft)."""

from __future__ import annotations

import logging
import socket
import threading
import uuid

import pytest
import redis

from redis_server import redis_url  # noqa: F401
from ternlm.cache import RedisResponseCache, ResponseCache, cache_key, make_cache
from ternlm.errors import ParamError

ROUTE, MODEL = "/v1/chat/completions", "tiny"
MESSAGES = [{"role": "user", "content": "hi"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("body", [
    {"temperature": 0},
    {"temperature": 0.0},
    {"temperature": 0.8, "seed": 7},
    {"seed": 0},
    {"temperature": 0, "n": 1},
    {"temperature": 0, "n": None, "stream": False},
])
def test_deterministic_requests_have_a_key(body: dict) -> None:
    key = cache_key(ROUTE, MODEL, {"messages": MESSAGES, **body})
    assert key is not None and len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize("body", [
    {},  # OpenAI's default temperature is 1
    {"temperature": 0.7},
    {"temperature": None},
    {"temperature": 1, "seed": None},
    {"temperature": False},
    {"temperature": 0, "stream": True},
    {"seed": 3, "stream": True},
    {"temperature": 0, "n": 2},
    {"temperature": 0, "logit_bias": {"1": float("nan")}},
])
def test_other_requests_have_none(body: dict) -> None:
    assert cache_key(ROUTE, MODEL, {"messages": MESSAGES, **body}) is None


def test_key_is_canonical() -> None:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 5}
    key = cache_key(ROUTE, MODEL, body)
    assert cache_key(ROUTE, MODEL, dict(reversed(body.items()))) == key  # key order does not matter
    assert cache_key(ROUTE, MODEL, {**body, "user": "alice"}) == key  # nor does the user
    assert cache_key(ROUTE, "other", body) != key
    assert cache_key("/v1/completions", MODEL, body) != key
    assert cache_key(ROUTE, MODEL, {**body, "max_tokens": 6}) != key
    assert cache_key(ROUTE, MODEL, {**body, "messages": [{"role": "user", "content": "ho"}]}) != key


def test_lru_eviction() -> None:
    cache = ResponseCache(max_entries=2)
    cache.put("a", b"A")
    cache.put("b", b"B")
    assert cache.get("a") == b"A"  # now b is the least recently used
    cache.put("c", b"C")
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (b"A", b"C")
    cache.put("a", b"A2")
    assert cache.get("a") == b"A2"
    assert cache.get("missing") is None


def test_ttl_expiry() -> None:
    clock = FakeClock()
    cache = ResponseCache(max_entries=10, ttl=5.0, clock=clock)
    cache.put("a", b"A")
    clock.now += 4.9
    assert cache.get("a") == b"A"
    clock.now += 0.2
    assert cache.get("a") is None
    assert "a" not in cache._entries  # an expired entry frees its space


def test_bad_arguments() -> None:
    with pytest.raises(ParamError):
        ResponseCache(max_entries=0)
    with pytest.raises(ParamError):
        ResponseCache(ttl=0)
    with pytest.raises(ParamError):
        make_cache(-1, None)


def test_threads() -> None:
    cache = ResponseCache(max_entries=50)
    errors: list[str] = []

    def work(t: int) -> None:
        for i in range(300):
            key = f"{t}:{i % 80}"
            cache.put(key, key.encode())
            got = cache.get(f"{t}:{(i * 7) % 80}")
            if got is not None and got != f"{t}:{(i * 7) % 80}".encode():
                errors.append(f"wrong value for thread {t}, step {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache._entries) == 50


def test_make_cache(redis_url: str) -> None:  # noqa: F811
    assert make_cache(0, None) is None
    local = make_cache(8, None, ttl=2.0)
    assert type(local) is ResponseCache and local.max_entries == 8 and local.ttl == 2.0
    shared = make_cache(0, redis_url)
    assert isinstance(shared, RedisResponseCache) and shared.ttl == 3600.0
    shared = make_cache(0, redis_url, ttl=5.0)
    assert isinstance(shared, RedisResponseCache) and shared.ttl == 5.0


def test_redis_cache_is_shared(redis_url: str) -> None:  # noqa: F811
    prefix = f"test:{uuid.uuid4().hex}:"
    a = RedisResponseCache(redis_url, ttl=30.0, prefix=prefix)
    b = RedisResponseCache(redis_url, ttl=30.0, prefix=prefix)
    key = cache_key(ROUTE, MODEL, {"messages": MESSAGES, "temperature": 0})
    assert key is not None
    assert b.get(key) is None
    a.put(key, b'{"id": "x"}')
    assert b.get(key) == b'{"id": "x"}'
    ttl_ms = redis.Redis.from_url(redis_url).pttl(prefix + key)
    assert 25_000 < ttl_ms <= 30_000
    forever = RedisResponseCache(redis_url, ttl=None, prefix=prefix)
    forever.put("k", b"v")
    assert redis.Redis.from_url(redis_url).pttl(prefix + "k") == -1  # no expiry


def test_redis_down_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = RedisResponseCache(f"redis://:secret@127.0.0.1:{port}/0")
    with caplog.at_level(logging.WARNING, logger="ternlm.cache"):
        assert cache.get("k") is None
        cache.put("k", b"v")
        assert cache.get("k") is None
    warnings = [r for r in caplog.records if r.name == "ternlm.cache"]
    assert len(warnings) == 1  # one warning, not one per request
    assert "secret" not in warnings[0].getMessage() and str(port) in warnings[0].getMessage()
