"""Tamper-evident audit log of the server: one HMAC-chained SQLite record per HTTP request.

Each record's MAC covers the previous record's MAC and every field of the record (content as it lies on
disk, so verification needs only the secret, not the content key). Deleting the newest records leaves a
chain that is still consistent, so an anchor file beside the database (``<db>.anchor``) holds the last seq
and MAC, itself MAC'd; it is rewritten after every append while the writer lock is held.

Appends from several threads or processes serialize on an exclusive lock on ``<db>.lock`` held across the
SQLite transaction *and* the anchor rewrite (SQLite's own write lock ends at COMMIT, before the anchor is
written). A process killed at any moment leaves either the old anchor with at most one newer committed
record, or the new anchor; ``verify`` accepts exactly that.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import operator
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ternlm.errors import FormatError, ParamError, TernlmError

try:
    import fcntl
except ImportError:  # Windows: AuditLog refuses to open, the rest of ternlm still imports
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
MIN_SECRET_BYTES = 16
CONTENT_KEY_BYTES = 32
BUSY_TIMEOUT_S = 10.0
_ZERO_MAC = bytes(32)
_NONCE_BYTES = 12
_ANCHOR_DOMAIN = b"ternlm-audit-anchor\x00"

_SCHEMA = """
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    key_name TEXT,
    route TEXT NOT NULL,
    model TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    client TEXT,
    prompt BLOB,
    completion BLOB,
    encrypted INTEGER NOT NULL,
    extra TEXT,
    prev_mac BLOB NOT NULL,
    mac BLOB NOT NULL
)
"""
# Every column but prev_mac and mac goes into the MAC input, under these names.
_FIELDS = ("seq", "time", "key_name", "route", "model", "prompt_tokens", "completion_tokens", "status",
           "latency_ms", "client", "prompt", "completion", "encrypted", "extra")
_SELECT = f"SELECT {', '.join(_FIELDS)}, prev_mac, mac FROM audit"


@dataclass(frozen=True)
class AuditEntry:
    """What the server records about one HTTP request."""

    key_name: str | None
    route: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    status: int
    latency_ms: float
    client: str | None
    prompt: str | None = None
    completion: str | None = None
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``AuditLog.verify``: ``records`` counts the records found intact before ``first_bad``."""

    ok: bool
    records: int
    first_bad: int | None
    reason: str


def _canonical(row: dict[str, Any]) -> bytes:
    """The MAC input for one record's fields; bytes (ciphertext) enter as base64 so it matches the disk."""
    fields = {k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v for k, v in row.items()}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _record_mac(secret: bytes, prev_mac: bytes, row: dict[str, Any]) -> bytes:
    return hmac.new(secret, prev_mac + _canonical(row), hashlib.sha256).digest()


def _anchor_mac(secret: bytes, seq: int, mac: bytes) -> bytes:
    return hmac.new(secret, _ANCHOR_DOMAIN + f"{seq}:{mac.hex()}".encode("ascii"), hashlib.sha256).digest()


def _clean_text(value: Any, name: str, *, optional: bool = True) -> str | None:
    """A str SQLite can store and give back unchanged: lone surrogates (legal in JSON) become U+FFFD."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ParamError(f"audit entry field {name!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _int(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ParamError(f"audit entry field {name!r} must be an integer, got {value!r}") from None


def _aad(seq: int, field: str) -> bytes:
    """Binds a ciphertext to its record and column, so fields cannot be swapped or moved."""
    return f"{seq}:{field}".encode("ascii")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iso(t: Any) -> str | None:
    if not isinstance(t, float) or not math.isfinite(t):
        return None  # only a hand-edited record has this; verify names it
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AuditLog:
    """An append-only, HMAC-chained audit log in one SQLite file, shareable by several server processes."""

    def __init__(self, path: str | Path, secret: bytes, content_key: bytes | None = None) -> None:
        if fcntl is None:
            raise TernlmError("the audit log needs POSIX file locks (fcntl), which this platform lacks")
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise ParamError(f"the audit secret must be at least {MIN_SECRET_BYTES} bytes")
        if content_key is not None and (not isinstance(content_key, bytes) or len(content_key) != CONTENT_KEY_BYTES):
            raise ParamError(f"the audit content key must be {CONTENT_KEY_BYTES} bytes (AES-256)")
        self.path = Path(path)
        self.anchor_path = self.path.with_name(self.path.name + ".anchor")
        self._secret = secret
        self._aead = AESGCM(content_key) if content_key is not None else None
        self._lock = threading.Lock()
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._lock_fd: int | None = os.open(self.path.with_name(self.path.name + ".lock"),
                                            os.O_RDWR | os.O_CREAT, 0o600)
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = self._connect()
            with self._exclusive():  # switching to WAL takes a lock SQLite's busy timeout does not wait for
                self._init_schema(self._conn)
        except sqlite3.DatabaseError as e:
            self.close()
            raise FormatError(f"{self.path} is not a ternlm audit log (SQLite says: {e})") from e
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
                if version == 0:
                    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise FormatError(f"{self.path} is an SQLite database but not a ternlm audit log")
                    conn.execute(_SCHEMA)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if version != SCHEMA_VERSION:
            raise FormatError(f"{self.path} is an audit log of schema version {version}; "
                              f"this ternlm reads version {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Holds the thread lock and the cross-process file lock (threads of one instance share its fd)."""
        with self._lock:
            if self._lock_fd is None:
                raise TernlmError(f"the audit log {self.path} is closed")
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TernlmError(f"the audit log {self.path} stayed locked for "
                                          f"{BUSY_TIMEOUT_S:.0f} s") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read_anchor(self) -> tuple[int, bytes] | None:
        """The anchor's (seq, mac); None when there is no anchor file; FormatError when it is not genuine."""
        try:
            raw = self.anchor_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            seq, mac, tag = doc["seq"], bytes.fromhex(doc["mac"]), bytes.fromhex(doc["anchor_mac"])
            valid = type(seq) is int and seq >= 1 and len(mac) == 32
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid or not hmac.compare_digest(tag, _anchor_mac(self._secret, seq, mac)):
            raise FormatError(f"the anchor file {self.anchor_path} was altered or belongs to another secret "
                              "(its MAC does not match)")
        return seq, mac

    def _write_anchor(self, seq: int, mac: bytes) -> None:
        """Replaces the anchor atomically and durably: temp file, fsync, rename, fsync of the directory."""
        doc = {"seq": seq, "mac": mac.hex(), "anchor_mac": _anchor_mac(self._secret, seq, mac).hex()}
        tmp = self.anchor_path.with_name(self.anchor_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.anchor_path)
        _fsync_dir(self.anchor_path.parent)

    def _check_tail(self, conn: sqlite3.Connection, last: tuple[int, bytes] | None) -> None:
        """Refuses to extend a log whose tail disagrees with the anchor: appending would erase the evidence."""
        anchor = self._read_anchor()
        last_seq = last[0] if last else 0
        if anchor is None:
            if last is not None:
                raise FormatError(f"the anchor file {self.anchor_path} is missing but the log holds records; "
                                  "run `verify` on the audit log")
            return
        a_seq, a_mac = anchor
        if not a_seq <= last_seq <= a_seq + 1:
            raise FormatError(f"the audit log {self.path} ends at record {last_seq} but its anchor says {a_seq}; "
                              "records were removed or the anchor was replaced; run `verify`")
        row = conn.execute("SELECT mac FROM audit WHERE seq = ?", (a_seq,)).fetchone()
        if row is None or not isinstance(row[0], bytes) or not hmac.compare_digest(row[0], a_mac):
            raise FormatError(f"record {a_seq} of the audit log {self.path} does not match its anchor; run `verify`")

    def append(self, entry: AuditEntry) -> int:
        """Adds one record, durably (committed, anchor rewritten) before returning its seq. Thread-safe."""
        if self._conn is None:
            raise TernlmError(f"the audit log {self.path} is closed")
        latency = float(entry.latency_ms)
        if not math.isfinite(latency):
            raise ParamError(f"audit entry latency_ms must be finite, got {entry.latency_ms!r}")
        extra = None
        if entry.extra is not None:
            try:
                extra = json.dumps(entry.extra, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                   allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ParamError(f"audit entry extra is not JSON-able: {e}") from e
            extra = _clean_text(extra, "extra")
        row: dict[str, Any] = {
            "time": time.time(),
            "key_name": _clean_text(entry.key_name, "key_name"),
            "route": _clean_text(entry.route, "route", optional=False),
            "model": _clean_text(entry.model, "model"),
            "prompt_tokens": _int(entry.prompt_tokens, "prompt_tokens"),
            "completion_tokens": _int(entry.completion_tokens, "completion_tokens"),
            "status": _int(entry.status, "status"),
            "latency_ms": latency,
            "client": _clean_text(entry.client, "client"),
            "encrypted": 1 if self._aead is not None else 0,
            "extra": extra,
        }
        content = {"prompt": _clean_text(entry.prompt, "prompt"),
                   "completion": _clean_text(entry.completion, "completion")}
        conn = self._conn
        with self._exclusive():
            conn.execute("BEGIN IMMEDIATE")
            try:
                last = conn.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                self._check_tail(conn, last)
                seq, prev_mac = (last[0] + 1, last[1]) if last else (1, _ZERO_MAC)
                row["seq"] = seq
                for field, text in content.items():
                    if text is not None and self._aead is not None:
                        nonce = secrets.token_bytes(_NONCE_BYTES)
                        row[field] = nonce + self._aead.encrypt(nonce, text.encode("utf-8"), _aad(seq, field))
                    else:
                        row[field] = text
                mac = _record_mac(self._secret, prev_mac, row)
                conn.execute(f"INSERT INTO audit ({', '.join(_FIELDS)}, prev_mac, mac) "
                             f"VALUES ({', '.join('?' * (len(_FIELDS) + 2))})",
                             [row[f] for f in _FIELDS] + [prev_mac, mac])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._write_anchor(seq, mac)
        return seq

    def verify(self) -> VerifyResult:
        """Walks the chain from record 1 and checks its end against the anchor; names the first bad record."""
        conn = self._connect()
        try:
            with self._exclusive():
                # The snapshot starts at the first read; taking it with the anchor under the writer lock makes
                # the two agree even while other processes append.
                conn.execute("BEGIN")
                conn.execute("SELECT count(*) FROM audit").fetchone()
                try:
                    anchor: tuple[int, bytes] | None = self._read_anchor()
                    anchor_problem = None
                except FormatError:
                    anchor, anchor_problem = None, "the anchor file was altered (its MAC does not match)"
            result = self._walk(conn, anchor, anchor_problem)
            conn.execute("COMMIT")
            return result
        finally:
            conn.close()

    def _walk(self, conn: sqlite3.Connection, anchor: tuple[int, bytes] | None,
              anchor_problem: str | None) -> VerifyResult:
        good = 0
        prev_mac = _ZERO_MAC
        anchor_mac_seen: bytes | None = None
        for values in conn.execute(_SELECT + " ORDER BY seq"):
            row = dict(zip(_FIELDS, values[:-2], strict=True))
            stored_prev, stored_mac = values[-2:]
            seq, expected = row["seq"], good + 1
            if seq != expected:
                if seq < expected:
                    why = f"record {seq} should not exist (the log starts at 1)"
                    return VerifyResult(False, good, seq, why)
                span = f"record {expected} is" if seq == expected + 1 else f"records {expected}-{seq - 1} are"
                why = f"{span} missing (seq jumps from {good} to {seq})" if good else \
                    f"{span} missing (the log starts at {seq})"
                return VerifyResult(False, good, expected, why)
            try:
                mac_ok = _row_well_formed(row) and isinstance(stored_mac, bytes) and \
                    hmac.compare_digest(stored_mac, _record_mac(self._secret, prev_mac, row))
            except ValueError:  # an infinite REAL put there by hand: not JSON, so not what append wrote
                mac_ok = False
            if not mac_ok:
                return VerifyResult(False, good, seq, f"record {seq} was altered (its MAC does not match)")
            if stored_prev != prev_mac:
                return VerifyResult(False, good, seq, f"record {seq} does not link to record {seq - 1} "
                                                      "(its prev_mac differs)")
            prev_mac = stored_mac
            good = seq
            if anchor is not None and seq == anchor[0]:
                anchor_mac_seen = stored_mac
        return _check_anchor(good, anchor, anchor_problem, anchor_mac_seen)

    def records(self, decrypt: bool = True) -> Iterator[dict[str, Any]]:
        """Every record as a JSON-able dict in seq order; content is decrypted when the key is present.

        When it is not (or ``decrypt`` is False), prompt and completion stay base64 ciphertext and the
        record's ``encrypted`` is True. A content key that does not open a record raises ParamError.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            for values in conn.execute(_SELECT + " ORDER BY seq"):
                yield self._to_dict(dict(zip(_FIELDS, values[:-2], strict=True)), values[-2], values[-1], decrypt)
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _to_dict(self, row: dict[str, Any], prev_mac: Any, mac: Any, decrypt: bool) -> dict[str, Any]:
        seq = row["seq"]
        out = {k: row[k] for k in _FIELDS if k not in ("prompt", "completion", "encrypted", "extra")}
        out["time"], out["unix_time"] = _iso(row["time"]), row["time"]
        try:
            out["extra"] = json.loads(row["extra"]) if row["extra"] is not None else None
        except (TypeError, ValueError):
            out["extra"] = row["extra"]  # hand-edited; verify names it
        encrypted = bool(row["encrypted"])
        opened = encrypted and decrypt and self._aead is not None
        for field in ("prompt", "completion"):
            value = row[field]
            if isinstance(value, bytes):
                if opened:
                    try:
                        out[field] = self._aead.decrypt(value[:_NONCE_BYTES], value[_NONCE_BYTES:],
                                                        _aad(seq, field)).decode("utf-8")
                    except (InvalidTag, ValueError) as e:
                        raise ParamError(f"the audit content key does not open the {field} of record {seq} "
                                         "(wrong key, or the record was altered: run `verify`)") from e
                else:
                    out[field] = base64.b64encode(value).decode("ascii")
            else:
                out[field] = value
        out["encrypted"] = encrypted and not opened
        out["prev_mac"] = prev_mac.hex() if isinstance(prev_mac, bytes) else None
        out["mac"] = mac.hex() if isinstance(mac, bytes) else None
        return out

    def export(self, out: IO[str], decrypt: bool = True) -> int:
        """Writes every record as one JSON line; returns how many."""
        n = 0
        for record in self.records(decrypt=decrypt):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        return n

    def close(self) -> None:
        """Closes the database and the lock file; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_well_formed(row: dict[str, Any]) -> bool:
    """Storage types as append writes them; the MAC alone cannot tell a BLOB from TEXT holding its base64."""
    kind = bytes if row["encrypted"] == 1 else str
    return row["encrypted"] in (0, 1) and all(row[f] is None or isinstance(row[f], kind)
                                                for f in ("prompt", "completion"))


def _check_anchor(last: int, anchor: tuple[int, bytes] | None, anchor_problem: str | None,
                  anchor_mac_seen: bytes | None) -> VerifyResult:
    """The end of an intact chain against the anchor: equal, or one record newer (a crash before the rewrite)."""
    if anchor_problem is not None:
        return VerifyResult(False, last, last + 1, f"{anchor_problem}: cannot tell whether records after "
                                                  f"{last} were removed")
    if anchor is None:
        if last == 0:
            return VerifyResult(True, 0, None, "chain intact: 0 records")
        return VerifyResult(False, last, last + 1, f"anchor file missing: cannot tell whether records after "
                                                  f"{last} were removed")
    a_seq, a_mac = anchor
    if a_seq > last:
        n = a_seq - last
        what = "the last record is" if n == 1 else f"the last {n} records are"
        return VerifyResult(False, last, last + 1,
                            f"{what} missing (the anchor says {a_seq}, the log ends at {last})")
    if anchor_mac_seen is None or not hmac.compare_digest(anchor_mac_seen, a_mac):
        return VerifyResult(False, a_seq - 1, a_seq, f"record {a_seq} does not match the anchor (the log was "
                                                     "replaced from that record on)")
    if last > a_seq + 1:
        return VerifyResult(False, a_seq + 1, a_seq + 2, f"records {a_seq + 2}-{last} are not covered by the "
                                                         f"anchor (the anchor says {a_seq}, the log ends at {last})")
    return VerifyResult(True, last, None, f"chain intact: {last} records")


def _parse_key_text(text: str) -> list[bytes]:
    """The byte strings a key given as text may mean, in order of preference: hex, then base64."""
    text = text.strip()
    out = []
    with contextlib.suppress(ValueError):
        out.append(bytes.fromhex(text))
    with contextlib.suppress(binascii.Error, ValueError):
        out.append(base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True))  # also url-safe
    return [b for b in out if b]


def _secret_from_text(raw: bytes, where: str) -> bytes:
    """Hex or base64 text decoding to >= 16 bytes, else the raw bytes themselves when long enough."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        for candidate in _parse_key_text(text):
            if len(candidate) >= MIN_SECRET_BYTES:
                return candidate
        raw = text.strip().encode("utf-8")
    if len(raw) >= MIN_SECRET_BYTES:
        return raw
    raise ParamError(f"the audit secret in {where} is too short: it needs at least {MIN_SECRET_BYTES} bytes "
                     "(hex, base64 or a plain string)")


def load_secret(path: str | Path | None, env: str = "TERNLM_AUDIT_SECRET", create_at: Path | None = None) -> bytes:
    """The audit HMAC secret: from ``env``, else the file at ``path``, else the file at ``create_at``.

    A missing ``create_at`` file is generated (32 random bytes, hex, mode 0600, directory 0700), so a default
    install has a secret without setup. An explicit ``path`` that does not exist is an error, not a fallback.
    """
    value = os.environ.get(env)
    if value:
        return _secret_from_text(value.encode("utf-8"), f"${env}")
    if path is not None:
        try:
            return _secret_from_text(Path(path).read_bytes(), str(path))
        except FileNotFoundError:
            raise ParamError(f"the audit secret file {path} does not exist") from None
    if create_at is None:
        raise ParamError(f"no audit secret: set ${env} or give a secret file")
    create_at = Path(create_at)
    if not create_at.exists():
        _create_secret_file(create_at)
    return _secret_from_text(create_at.read_bytes(), str(create_at))


def _create_secret_file(target: Path) -> None:
    """Writes a fresh secret without ever exposing a partial file; if another process wins, its secret stays."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32).hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def load_content_key(path: str | Path | None, env: str = "TERNLM_AUDIT_KEY") -> bytes | None:
    """The AES-256 content key (64 hex chars or base64 of 32 bytes) from ``env`` or the file; None if neither."""
    value = os.environ.get(env)
    where = f"${env}"
    if not value:
        if path is None:
            return None
        where = str(path)
        try:
            value = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ParamError(f"the audit content key file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ParamError(f"the audit content key in {path} is not text (want 64 hex chars or base64)") from None
    for candidate in _parse_key_text(value):
        if len(candidate) == CONTENT_KEY_BYTES:
            return candidate
    raise ParamError(f"the audit content key in {where} must be {CONTENT_KEY_BYTES} bytes given as 64 hex chars "
                     "or base64")


def open_log(db: str | Path, secret_file: str | Path | None = None, key_file: str | Path | None = None,
             create: bool = False) -> AuditLog:
    """The audit log at `db` with its secret (TERNLM_AUDIT_SECRET, `secret_file`, or DB.secret beside it —
    generated there when `create`, as a server does on first start) and its optional content key."""
    default = Path(str(db) + ".secret")
    if secret_file is None and not create and not default.exists():
        secret_file = default  # never invent a secret just to verify: say that it is missing
    secret = load_secret(secret_file, create_at=default if secret_file is None else None)
    return AuditLog(db, secret, load_content_key(key_file))
