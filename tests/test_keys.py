"""API-key store: key format, hashing, revocation, limits, sharing between stores and threads, bad files."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ternlm.errors import FormatError, ParamError, TernlmError
from ternlm.keys import ROLES, KeyRecord, KeyStore


@pytest.fixture
def store(tmp_path: Path):
    s = KeyStore(tmp_path / "keys.db")
    yield s
    s.close()


def _store_bytes(directory: Path) -> bytes:
    """Everything SQLite wrote: main file, WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


@pytest.mark.parametrize("role", ROLES)
def test_create_verify_roundtrip(store: KeyStore, role: str) -> None:
    key, rec = store.create(f"k-{role}", role)
    assert key.startswith(f"tlm-{rec.id}-")
    assert len(rec.id) == 12 and all(c in "0123456789abcdef" for c in rec.id)
    assert rec.role == role and rec.name == f"k-{role}" and not rec.revoked
    assert store.verify(key) == rec
    assert store.get(rec.id) == rec == store.get(rec.name)
    assert store.any_active()


def test_plaintext_never_stored(tmp_path: Path) -> None:
    s = KeyStore(tmp_path / "keys.db")
    keys = [s.create(f"k{i}", "user")[0] for i in range(3)]
    data = _store_bytes(tmp_path)
    s.close()
    data += _store_bytes(tmp_path)  # after the WAL is checkpointed into the main file
    for key in keys:
        secret = key.split("-", 2)[2]
        assert key.encode() not in data
        assert secret.encode() not in data


def test_public_has_no_secret(store: KeyStore) -> None:
    key, rec = store.create("web", "user", rpm=10)
    pub = rec.public()
    assert set(pub) == {"id", "name", "role", "created", "revoked", "rpm", "tpm", "max_tokens", "max_prompt_tokens"}
    text = json.dumps(pub)
    assert key.split("-", 2)[2] not in text
    assert pub["rpm"] == 10 and pub["revoked"] is False


def test_revoked_and_wrong_secret_rejected(store: KeyStore) -> None:
    key, rec = store.create("a", "user")
    other, _ = store.create("b", "user")
    wrong = key[: -43] + other[-43:]  # right id, someone else's (well-formed) secret
    assert store.verify(wrong) is None
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    revoked = store.revoke("a")
    assert revoked.revoked and revoked.id == rec.id
    assert store.verify(key) is None
    assert store.verify(other) is not None
    with pytest.raises(ParamError, match="already revoked"):
        store.revoke(rec.id)
    with pytest.raises(ParamError, match="already revoked"):
        store.revoke("a")
    with pytest.raises(ParamError, match="does not exist"):
        store.revoke("nobody")
    for odd in ("\ud800", "", "x" * 1000, "é"):
        with pytest.raises(ParamError):
            store.get(odd)
        with pytest.raises(ParamError):
            store.revoke(odd)
    with pytest.raises(ParamError):
        store.get("a")


def test_unknown_id_rejected(store: KeyStore) -> None:
    key, rec = store.create("a", "user")
    fake_id = "0" * 12 if rec.id != "0" * 12 else "1" * 12
    assert store.verify(f"tlm-{fake_id}-{key[-43:]}") is None


GARBAGE = ["", "tlm-", "tlm--", "Bearer x", "tlm-" + "a" * 12 + "-", "tlm-" + "A" * 12 + "-" + "a" * 43,
           "tlm-" + "a" * 12 + "-" + "a" * 43 + "\n", "tlm-" + "a" * 12 + "-" + "é" * 43, "\x00" * 64,
           "tlm-\ud800" * 5, "x" * 10_000_000, "tlm-" + "a" * 12 + "-" + "\ud800" * 43, "🔑" * 100]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_never_raises(store: KeyStore, garbage: str) -> None:
    assert store.verify(garbage) is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(), tail=st.text(max_size=50))
def test_garbage_text_never_raises(store: KeyStore, text: str, tail: str) -> None:
    assert store.verify(text) is None
    assert store.verify("tlm-" + text) is None
    assert store.verify("tlm-0123456789ab-" + tail) is None


def test_verify_non_string_is_none(store: KeyStore) -> None:
    assert store.verify(None) is None  # type: ignore[arg-type]
    assert store.verify(b"tlm-0123456789ab-x") is None  # type: ignore[arg-type]


def test_names_and_roles(store: KeyStore) -> None:
    key1, first = store.create("svc", "user")
    with pytest.raises(ParamError, match="already named"):
        store.create("svc", "admin")
    store.revoke("svc")
    key2, second = store.create("svc", "admin")  # a revoked key's name is free again
    assert second.id != first.id and store.get("svc") == second
    assert store.verify(key1) is None and store.verify(key2) == second
    assert [r.id for r in store.list()] == [second.id]
    assert [r.id for r in store.list(include_revoked=True)] == [first.id, second.id]
    for bad in ("", " ", "a b", "-x", "x" * 65, "0123456789ab", "naïve", "a\nb"):
        with pytest.raises(ParamError):
            store.create(bad, "user")
    for role in ("root", "", "Admin"):
        with pytest.raises(ParamError, match="role"):
            store.create("ok", role)


def test_limits(store: KeyStore) -> None:
    key, rec = store.create("lim", "user", rpm=60, tpm=1000, max_tokens=256)
    assert (rec.rpm, rec.tpm, rec.max_tokens, rec.max_prompt_tokens) == (60, 1000, 256, None)
    assert store.verify(key) == rec
    updated = store.set_limits("lim", rpm=None, max_prompt_tokens=4096)
    assert (updated.rpm, updated.tpm, updated.max_tokens, updated.max_prompt_tokens) == (None, 1000, 256, 4096)
    assert store.get(rec.id) == updated == store.verify(key)
    assert store.set_limits(rec.id) == updated
    for bad in ({"rpm": 0}, {"tpm": -5}, {"max_tokens": 1.5}, {"rpm": True}, {"rpm": "10"}, {"rpm": 2**64},
                {"burst": 3}, {"role": "admin"}):
        with pytest.raises(ParamError):
            store.set_limits("lim", **bad)
    assert store.get("lim") == updated
    with pytest.raises(ParamError):
        store.create("neg", "user", rpm=-1)
    with pytest.raises(ParamError):
        store.set_limits("nobody", rpm=5)


def test_two_stores_see_each_other(tmp_path: Path) -> None:
    cli, server = KeyStore(tmp_path / "keys.db"), KeyStore(tmp_path / "keys.db")
    try:
        assert not server.any_active()
        key, rec = cli.create("late", "user")
        assert server.any_active()
        assert server.verify(key) == rec
        cli.set_limits("late", rpm=7)
        assert server.verify(key).rpm == 7
        cli.revoke(rec.id)
        assert server.verify(key) is None
        assert not server.any_active()
        key2, rec2 = server.create("late", "metrics")
        assert cli.verify(key2) == rec2
    finally:
        cli.close()
        server.close()


def test_threads(tmp_path: Path) -> None:
    s = KeyStore(tmp_path / "keys.db")
    errors: list[BaseException] = []
    made: list[tuple[str, KeyRecord]] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(6):
                key, rec = s.create(f"t{t}-{i}", ROLES[i % len(ROLES)])
                made.append((key, rec))
                assert s.verify(key) == rec
                assert s.verify(key[:-2] + "zz") is None or key.endswith("zz")
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(made) == 48 and len({r.id for _, r in made}) == 48
    assert all(s.verify(k) == r for k, r in made)
    assert len(s.list()) == 48
    s.close()


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "keys.db"
    bad.write_bytes(b"this is definitely not SQLite\n" * 200)
    with pytest.raises(FormatError, match=re.escape(str(bad))):
        KeyStore(bad)


def test_other_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE things (x)")
    conn.close()
    with pytest.raises(FormatError, match="not a ternlm key store"):
        KeyStore(path)


def test_newer_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    KeyStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    with pytest.raises(FormatError, match="version 2"):
        KeyStore(path)


def test_reopen_keeps_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    s = KeyStore(path)
    key, rec = s.create("keep", "admin", tpm=9)
    s.close()
    with KeyStore(path) as again:
        assert again.verify(key) == rec


def test_permissions(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "keys.db"
    s = KeyStore(path)
    s.create("p", "user")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for side in path.parent.glob("keys.db-*"):  # WAL and shared memory follow the main file's mode
        assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0
    s.close()


def test_closed_store_raises(tmp_path: Path) -> None:
    s = KeyStore(tmp_path / "keys.db")
    s.close()
    s.close()
    with pytest.raises(TernlmError, match="closed"):
        s.list()


def test_concurrent_first_open(tmp_path: Path) -> None:
    """Several servers starting at once on a fresh path: one creates directory and schema, none fails."""
    path = tmp_path / "fresh" / "keys.db"
    stores: list[KeyStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def open_one() -> None:
        try:
            start.wait()
            stores.append(KeyStore(path))
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    key, rec = stores[0].create("first", "user")
    assert all(s.verify(key) == rec for s in stores)
    for s in stores:
        s.close()
