"""Rate limiter: bucket arithmetic on a fake clock, then the same behaviour through a real Redis."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import redis

from redis_server import redis_url  # noqa: F401
from ternlm import ratelimit
from ternlm.errors import ParamError, TernlmError
from ternlm.ratelimit import Limits, RateLimiter, RedisRateLimiter, format_duration, make_limiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def test_rpm_exhaustion_and_retry_after(limiter: RateLimiter) -> None:
    limits = Limits(rpm=3)
    assert all(limiter.acquire("k", limits, 0).allowed for _ in range(3))
    d = limiter.acquire("k", limits, 0)
    assert not d.allowed
    assert d.retry_after == pytest.approx(20.0)
    assert d.headers["Retry-After"] == "20"
    assert "3 requests per minute" in d.reason
    assert limiter.acquire("other", limits, 0).allowed  # keys have their own buckets


def test_refill_over_time(limiter: RateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=3)
    for _ in range(3):
        limiter.acquire("k", limits, 0)
    clock.now += 20.0
    assert limiter.acquire("k", limits, 0).allowed
    clock.now += 10.0
    d = limiter.acquire("k", limits, 0)
    assert not d.allowed and d.retry_after == pytest.approx(10.0)
    clock.now += 600.0  # a long idle time refills to capacity, not beyond
    assert [limiter.acquire("k", limits, 0).allowed for _ in range(4)] == [True, True, True, False]


def test_tpm_exhaustion(limiter: RateLimiter) -> None:
    limits = Limits(tpm=100)
    assert limiter.acquire("k", limits, 60).allowed
    d = limiter.acquire("k", limits, 50)
    assert not d.allowed
    assert d.retry_after == pytest.approx(6.0)  # 10 tokens short at 100/60 per second
    assert d.headers["Retry-After"] == "6"
    assert "100 tokens per minute" in d.reason
    assert limiter.acquire("k", limits, 40).allowed


def test_both_or_neither(limiter: RateLimiter) -> None:
    limits = Limits(rpm=2, tpm=100)
    assert limiter.acquire("k", limits, 80).allowed
    d = limiter.acquire("k", limits, 50)
    assert not d.allowed
    assert d.headers["x-ratelimit-remaining-requests"] == "1"  # the refusal took no request slot
    assert limiter.acquire("k", limits, 10).allowed
    d = limiter.acquire("k", limits, 0)
    assert not d.allowed and "requests per minute" in d.reason
    assert d.headers["x-ratelimit-remaining-tokens"] == "10"  # nor any tokens


def test_refund(limiter: RateLimiter) -> None:
    limits = Limits(tpm=100)
    assert limiter.acquire("k", limits, 100).allowed
    limiter.refund("k", limits, 30)
    assert limiter.acquire("k", limits, 30).allowed
    assert not limiter.acquire("k", limits, 1).allowed

    assert limiter.acquire("j", limits, 10).allowed
    limiter.refund("j", limits, 50)  # more than was taken: the bucket stops at its capacity
    assert limiter.acquire("j", limits, 0).headers["x-ratelimit-remaining-tokens"] == "100"
    limiter.refund("never-seen", limits, 10)
    limiter.refund("j", Limits(), 10)


def test_oversize_request(limiter: RateLimiter) -> None:
    limits = Limits(rpm=1, tpm=100)
    d = limiter.acquire("k", limits, 101)
    assert not d.allowed
    assert d.retry_after == 0
    assert "Retry-After" not in d.headers
    assert "larger than" in d.reason and "100 tokens per minute" in d.reason
    assert limiter.acquire("k", limits, 100).allowed  # the oversize refusal used neither budget


def test_headers(limiter: RateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=60, tpm=1000)
    d = limiter.acquire("k", limits, 250)
    assert d.allowed and d.retry_after == 0
    assert d.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "15s",
    }
    clock.now += 0.5
    h = limiter.acquire("k", limits, 0).headers
    assert h["x-ratelimit-remaining-requests"] == "58"  # 59 + 0.5 refilled - 1
    assert h["x-ratelimit-reset-requests"] == "1.5s"
    assert h["x-ratelimit-remaining-tokens"] == "758"
    assert h["x-ratelimit-reset-tokens"] == "14.5s"

    only_rpm = limiter.acquire("r", Limits(rpm=10), 5).headers
    assert set(only_rpm) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                             "x-ratelimit-reset-requests"}
    only_tpm = limiter.acquire("t", Limits(tpm=10), 5).headers
    assert set(only_tpm) == {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}


def test_unlimited(limiter: RateLimiter) -> None:
    for _ in range(100):
        d = limiter.acquire("k", Limits(), 10**9)
        assert d.allowed and d.headers == {} and d.retry_after == 0


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-1, "0s"), (0.0001, "1ms"), (0.02, "20ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"),
    (12.345, "12.345s"), (60, "1m0s"), (90.25, "1m30.25s"), (360, "6m0s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_bad_arguments(limiter: RateLimiter) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ParamError):
            Limits(rpm=bad)  # type: ignore[arg-type]
        with pytest.raises(ParamError):
            Limits(tpm=bad)  # type: ignore[arg-type]
    with pytest.raises(ParamError):
        limiter.acquire("k", Limits(rpm=1), -1)
    with pytest.raises(ParamError):
        limiter.refund("k", Limits(tpm=1), -1)


def test_threads_get_exactly_the_limit(limiter: RateLimiter) -> None:
    limits = Limits(rpm=37, tpm=10_000)
    allowed: list[int] = []
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        allowed.append(sum(limiter.acquire("k", limits, 1).allowed for _ in range(50)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 37


def test_idle_keys_are_swept(limiter: RateLimiter, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "_SWEEP_EVERY", 1)
    limiter.acquire("old", Limits(rpm=1), 0)
    clock.now += 1000.0
    limiter.acquire("new", Limits(rpm=1), 0)
    assert set(limiter._state) == {"new"}
    assert limiter.acquire("old", Limits(rpm=1), 0).allowed  # a swept key is a full bucket


def test_make_limiter(redis_url: str) -> None:  # noqa: F811
    assert type(make_limiter(None)) is RateLimiter
    assert isinstance(make_limiter(redis_url), RedisRateLimiter)


# --- Redis: real server, real clock; limits small enough that refill within a test cannot change counts ---


def _key() -> str:
    return f"sk-{uuid.uuid4().hex}"


def test_redis_instances_share_one_budget(redis_url: str) -> None:  # noqa: F811
    a, b = RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)
    key, limits = _key(), Limits(rpm=5)
    results = [(a if i % 2 else b).acquire(key, limits, 0) for i in range(8)]
    assert [d.allowed for d in results] == [True] * 5 + [False] * 3
    refused = results[-1]
    assert 11.0 < refused.retry_after <= 12.0  # 60/rpm, less the few ms since the last grant
    assert refused.headers["Retry-After"] == "12"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "5 requests per minute" in refused.reason


def test_redis_tokens_refill_and_refund(redis_url: str) -> None:  # noqa: F811
    lim, key, limits = RedisRateLimiter(redis_url), _key(), Limits(tpm=600)  # 10 tokens per second
    assert lim.acquire(key, limits, 600).allowed
    d = lim.acquire(key, limits, 5)
    assert not d.allowed and 0.3 < d.retry_after <= 0.5
    time.sleep(d.retry_after + 0.05)
    assert lim.acquire(key, limits, 5).allowed
    lim.refund(key, limits, 200)
    assert lim.acquire(key, limits, 200).allowed
    lim.refund(key, limits, 10_000)
    assert lim.acquire(key, limits, 0).headers["x-ratelimit-remaining-tokens"] == "600"


def test_redis_both_or_neither_and_oversize(redis_url: str) -> None:  # noqa: F811
    lim, key, limits = RedisRateLimiter(redis_url), _key(), Limits(rpm=2, tpm=100)
    d = lim.acquire(key, limits, 101)
    assert not d.allowed and d.retry_after == 0 and "Retry-After" not in d.headers and "larger" in d.reason
    assert lim.acquire(key, limits, 80).allowed
    d = lim.acquire(key, limits, 50)
    assert not d.allowed and d.headers["x-ratelimit-remaining-requests"] == "1"
    assert lim.acquire(key, limits, 10).allowed
    assert not lim.acquire(key, limits, 0).allowed
    assert lim.acquire(key, Limits(), 10**6).allowed


def test_redis_keys_expire_and_are_hashed(redis_url: str) -> None:  # noqa: F811
    prefix = f"test:{uuid.uuid4().hex}:"
    lim, key = RedisRateLimiter(redis_url, prefix=prefix), _key()
    lim.acquire(key, Limits(rpm=10, tpm=100), 1)
    client = redis.Redis.from_url(redis_url)
    names = client.keys(prefix + "*")
    assert len(names) == 1 and key.encode() not in names[0]
    assert 0 < client.pttl(names[0]) <= 120_000


def test_redis_processes_share_one_budget(redis_url: str) -> None:  # noqa: F811
    key = _key()
    script = textwrap.dedent(f"""
        import sys
        from ternlm.ratelimit import Limits, RedisRateLimiter
        lim = RedisRateLimiter({redis_url!r})
        print("ready", flush=True)
        sys.stdin.readline()
        print(sum(lim.acquire({key!r}, Limits(rpm=10, tpm=1000), 1).allowed for _ in range(40)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:  # release both at once, after their imports and connections
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    counts = [int(p.communicate(timeout=30)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(counts) == 10


def test_redis_unreachable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TernlmError, match=f"cannot reach Redis at redis://127.0.0.1:{port}"):
        RedisRateLimiter(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(TernlmError, match=r"cannot reach Redis at redis://:\*\*\*@127.0.0.1"):
        RedisRateLimiter(f"redis://:hunter2@127.0.0.1:{port}/0")
