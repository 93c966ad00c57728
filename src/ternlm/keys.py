"""API-key store for the server's authentication: an embedded SQLite file shared by the CLI and running servers.

A key is ``tlm-<id>-<secret>``: the 12-hex-digit id is public (it names the key in listings and logs), the secret
is 256 random bits shown once at creation and never stored. The database keeps only the id, a random salt and
``sha256(salt + secret)``.

A fast salted hash is the right tool here. Slow KDFs (scrypt, argon2, bcrypt) exist to make guessing low-entropy
human passwords expensive; a 256-bit random secret cannot be guessed whatever the hash costs, while a per-request
scrypt would add milliseconds of CPU to every API call. The salt keeps equal secrets from having equal hashes.

Every call reads the database afresh (no cached validity), so a key created or revoked by ``ternlm keys`` in
another process takes effect on a server's next request. WAL mode lets those readers run while a writer commits.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ternlm.errors import FormatError, ParamError, TernlmError

ROLES: tuple[str, ...] = ("admin", "user", "metrics")

SCHEMA_VERSION = 1
KEY_PREFIX = "tlm-"
MAX_KEY_CHARS = 200  # far above a real key (60 chars); longer input is rejected before any work
MAX_LIMIT = 2**53 - 1  # limits stay exact in JSON clients
LIMIT_FIELDS: tuple[str, ...] = ("rpm", "tpm", "max_tokens", "max_prompt_tokens")

_KEY_RE = re.compile(r"tlm-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")
_ID_RE = re.compile(r"[0-9a-f]{12}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")

_SCHEMA = """
CREATE TABLE api_keys (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    role              TEXT NOT NULL,
    salt              BLOB NOT NULL,
    hash              BLOB NOT NULL,
    created           REAL NOT NULL,
    revoked_at        REAL,
    rpm               INTEGER,
    tpm               INTEGER,
    max_tokens        INTEGER,
    max_prompt_tokens INTEGER
);
CREATE UNIQUE INDEX api_keys_active_name ON api_keys(name) WHERE revoked_at IS NULL;
"""
_COLUMNS = "id, name, role, created, revoked_at, rpm, tpm, max_tokens, max_prompt_tokens"


@dataclass(frozen=True)
class KeyRecord:
    """What is known about one API key, never its secret or hash."""

    id: str
    name: str
    role: str
    created: float
    revoked: bool
    rpm: int | None = None
    tpm: int | None = None
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None

    def public(self) -> dict[str, Any]:
        """JSON-able form for `ternlm keys list --json` and the admin API; holds nothing secret by construction."""
        return asdict(self)


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


def _record(row: tuple[Any, ...]) -> KeyRecord:
    kid, name, role, created, revoked_at, rpm, tpm, max_tokens, max_prompt = row
    return KeyRecord(id=kid, name=name, role=role, created=created, revoked=revoked_at is not None,
                     rpm=rpm, tpm=tpm, max_tokens=max_tokens, max_prompt_tokens=max_prompt)


def _check_limits(limits: dict[str, Any]) -> None:
    for field, value in limits.items():
        if field not in LIMIT_FIELDS:
            raise ParamError(f"unknown limit {field!r}; limits are {', '.join(LIMIT_FIELDS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{field} must be a positive integer or None, got {value!r}")
        if not 1 <= value <= MAX_LIMIT:
            raise ParamError(f"{field} must be between 1 and {MAX_LIMIT}, got {value}")


def _is_ref(name_or_id: Any) -> bool:
    """Whether a lookup string can name a key at all (SQLite cannot bind lone surrogates; it would raise)."""
    if not isinstance(name_or_id, str) or not 0 < len(name_or_id) <= MAX_KEY_CHARS:
        return False
    return name_or_id.isascii()


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ParamError("key name must be a non-empty string")
    if not _NAME_RE.fullmatch(name):
        raise ParamError(f"invalid key name {name!r}: use 1-64 letters, digits or ._@:- starting with a letter "
                         "or digit")
    if _ID_RE.fullmatch(name):
        raise ParamError(f"invalid key name {name!r}: 12 hex digits would be mistaken for a key id")


class KeyStore:
    """API keys in a SQLite file; safe to share between threads (one locked connection) and processes (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # Verifying an unknown id hashes against this pair, so response time does not reveal which ids exist.
        self._dummy_salt = secrets.token_bytes(16)
        self._dummy_hash = _digest(self._dummy_salt, secrets.token_urlsafe(32))
        self._conn: sqlite3.Connection | None = self._open()

    def _open(self) -> sqlite3.Connection:
        parent = self.path.parent
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode applies only if we create it
            # Create the file ourselves so it is 0600 from the start; SQLite gives -wal/-shm the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            raise TernlmError(f"cannot open key store {self.path}: {e}") from e
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise TernlmError(f"cannot open key store {self.path}: {e}") from e
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(conn)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise FormatError(f"{self.path} is not a ternlm key store (not a usable SQLite database: {e})") from e
        except TernlmError:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema in an empty file, accept version 1, refuse anything else."""
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file at once: one creates, one waits
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                # Statement by statement: executescript() would commit the transaction that guards this check.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 0 or (version == SCHEMA_VERSION and "api_keys" not in tables):
                raise FormatError(f"{self.path} is a SQLite database but not a ternlm key store")
            elif version != SCHEMA_VERSION:
                raise FormatError(f"{self.path} has key-store schema version {version}; this ternlm reads version "
                                  f"{SCHEMA_VERSION} (written by a newer ternlm?)")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; a write runs in one IMMEDIATE transaction, rolled back on any error."""
        with self._lock:
            if self._conn is None:
                raise TernlmError(f"key store {self.path} is closed")
            try:
                if not write:
                    yield self._conn
                    return
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise TernlmError(f"key store {self.path}: {e}") from e

    @staticmethod
    def _find_active(conn: sqlite3.Connection, name_or_id: str) -> KeyRecord | None:
        # Names can never look like ids (see _check_name), so at most one active row matches.
        if not _is_ref(name_or_id):
            return None
        row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND (id = ? OR name = ?)",
                           (name_or_id, name_or_id)).fetchone()
        return _record(row) if row else None

    def create(self, name: str, role: str, *, rpm: int | None = None, tpm: int | None = None,
               max_tokens: int | None = None, max_prompt_tokens: int | None = None) -> tuple[str, KeyRecord]:
        """Make a key; returns (plaintext key, record). The plaintext is not stored: show it to the user once."""
        _check_name(name)
        if role not in ROLES:
            raise ParamError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        limits = {"rpm": rpm, "tpm": tpm, "max_tokens": max_tokens, "max_prompt_tokens": max_prompt_tokens}
        _check_limits(limits)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._db(write=True) as conn:
            if self._find_active(conn, name) is not None:
                raise ParamError(f"an active key is already named {name!r}; revoke it or choose another name")
            kid = secrets.token_hex(6)
            while conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (kid,)).fetchone():
                kid = secrets.token_hex(6)
            record = KeyRecord(id=kid, name=name, role=role, created=time.time(), revoked=False, **limits)
            conn.execute("INSERT INTO api_keys (id, name, role, salt, hash, created, revoked_at, rpm, tpm, "
                         "max_tokens, max_prompt_tokens) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                         (kid, name, role, salt, _digest(salt, secret), record.created, rpm, tpm, max_tokens,
                          max_prompt_tokens))
        return f"{KEY_PREFIX}{kid}-{secret}", record

    def list(self, include_revoked: bool = False) -> list[KeyRecord]:
        """Keys in creation order; revoked ones only when asked."""
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        with self._db() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY created, id").fetchall()
        return [_record(r) for r in rows]

    def get(self, name_or_id: str) -> KeyRecord:
        """The active key with this name or id."""
        with self._db() as conn:
            record = self._find_active(conn, name_or_id)
        if record is None:
            raise ParamError(f"no active key named or with id {name_or_id!r}")
        return record

    def revoke(self, name_or_id: str) -> KeyRecord:
        """Revoke the active key with this name or id; servers reject it from their next request on."""
        with self._db(write=True) as conn:
            record = self._find_active(conn, name_or_id)
            if record is None:
                revoked = _is_ref(name_or_id) and conn.execute("SELECT 1 FROM api_keys WHERE id = ? OR name = ?",
                                       (name_or_id, name_or_id)).fetchone()
                what = "is already revoked" if revoked else "does not exist"
                raise ParamError(f"key {name_or_id!r} {what}")
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), record.id))
        return KeyRecord(**{**asdict(record), "revoked": True})

    def set_limits(self, name_or_id: str, **limits: int | None) -> KeyRecord:
        """Change the given limits of an active key (None removes a limit); the others stay as they were."""
        _check_limits(limits)
        with self._db(write=True) as conn:
            record = self._find_active(conn, name_or_id)
            if record is None:
                raise ParamError(f"no active key named or with id {name_or_id!r}")
            if limits:
                # Column names come from LIMIT_FIELDS (checked above), never from the caller's strings.
                assignments = ", ".join(f"{f} = ?" for f in LIMIT_FIELDS if f in limits)
                values = [limits[f] for f in LIMIT_FIELDS if f in limits]
                conn.execute(f"UPDATE api_keys SET {assignments} WHERE id = ?", (*values, record.id))
        return KeyRecord(**{**asdict(record), **limits})

    def verify(self, key: str) -> KeyRecord | None:
        """The active record for a presented key; None for anything malformed, unknown or revoked.

        Never raises on the input (only on a broken database: TernlmError). The hash is computed and compared in
        constant time whether or not the id exists, so timing reveals neither the secret nor which ids exist.
        """
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            return None
        m = _KEY_RE.fullmatch(key)
        if m is None:
            return None
        kid, secret = m.groups()
        with self._db() as conn:
            row = conn.execute(f"SELECT salt, hash, {_COLUMNS} FROM api_keys WHERE id = ?", (kid,)).fetchone()
        salt, stored = (row[0], row[1]) if row else (self._dummy_salt, self._dummy_hash)
        ok = hmac.compare_digest(_digest(salt, secret), stored)
        if not ok or row is None:
            return None
        record = _record(row[2:])
        return None if record.revoked else record

    def any_active(self) -> bool:
        """Whether at least one key is active (the server may require keys only once one exists)."""
        with self._db() as conn:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)").fetchone()[0] == 1

    def close(self) -> None:
        """Close the connection; later calls raise TernlmError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
