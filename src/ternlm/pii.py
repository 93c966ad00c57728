"""Mask personal data (e-mail, phone, card, IBAN, SSN, IP addresses) in text the server receives or sends.

The detectors are data (`pii.toml`, or a user's TOML file): a regex that finds candidates and an optional
validator (Luhn, mod-97, ...) that rejects the ones that only look right. `PIIFilter.mask` masks a whole
text; `PIIFilter.stream` masks a token stream with the same result, however the text is cut into chunks.

How a text is scanned (the same rules in both modes, which is what makes streaming exact):

* Each detector names the character class its matches are made of (`chars`, e.g. ``[0-9 -]`` for cards)
  and the length of its longest match (`max_len`). A match lies inside one maximal run of `chars`.
* At a start position s inside such a run, the detector's regex is matched against a window of the text:
  two characters before s (so lookbehinds can test a boundary), and at most ``max_len + 2`` characters from s,
  cut one character past the end of the run (so lookaheads can test the character that ends it). The match
  must be non-empty, end inside the run, be at most `max_len` long and pass the validator. The regex's own
  match at s is the candidate: when the validator rejects it, no shorter match at s is tried.
* Overlaps: going left to right, the candidate with the earliest start wins; at equal starts the longest;
  at equal length the detector listed first. Candidates that start inside a chosen match are dropped.
* The chosen spans are replaced by their detector's mask. Masks are never scanned again.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from ternlm.errors import FormatError, ParamError

# Characters a pattern may look at before its start (a lookbehind such as `(?<![0-9][ -])`) and past the end
# of its longest match (a lookahead such as `(?!\.[0-9])`).
LOOKBEHIND = 2
LOOKAHEAD = 2
# The longest match a detector may declare: bounds the stream hold-back and the work per position.
MAX_LEN_LIMIT = 256
_DEFAULT_MAX_LEN = 64
_ANY_CHAR = r"[\s\S]"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_CHAR_CLASS = re.compile(r"\[(?:\\.|[^\]\\])+\]")
_FIELDS = {"name", "mask", "pattern", "validator", "description", "chars", "max_len"}
_REQUIRED = ("name", "mask", "pattern", "description")

# --- validators: the checks a regex cannot express -------------------------------------------------------


def _ascii_digits(text: str) -> list[int]:
    return [ord(c) - 48 for c in text if "0" <= c <= "9"]


def _luhn(text: str) -> bool:
    """Payment card: 13-19 digits whose Luhn checksum is 0 (not all one digit: 0000... passes Luhn)."""
    digits = _ascii_digits(text)
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN length by country (ISO 13616 registry) for the countries listed; others need 15-34 characters.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip
_IBAN_SHAPE = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")


def _iban(text: str) -> bool:
    """IBAN: country letters, check digits 02-98, the country's length, and the mod-97 remainder 1."""
    iban = text.replace(" ", "").upper()
    if not _IBAN_SHAPE.fullmatch(iban) or not 2 <= int(iban[2:4]) <= 98:
        return False
    if len(iban) != _IBAN_LENGTHS.get(iban[:2], len(iban)):
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _ssn(text: str) -> bool:
    """US SSN: area not 000, 666 or 9xx; group not 00; serial not 0000 (rules the SSA never issues)."""
    digits = "".join(c for c in text if "0" <= c <= "9")
    if len(digits) != 9:
        return False
    area, group, serial = int(digits[:3]), int(digits[3:5]), int(digits[5:])
    return area not in (0, 666) and area < 900 and group != 0 and serial != 0


def _ipv4(text: str) -> bool:
    """Dotted quad with each octet 0-255 and no leading zeros (the `ipaddress` module's strict form)."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _ipv6(text: str) -> bool:
    """A valid IPv6 address with a digit and a group of 3+ characters (or ::1): `a::b`, `dead::beef` or
    the slices `[::2]`, `[1::2]` in code are not masked; real addresses start fe80, 2001, ff02, ..."""
    if text.count(":") < 2 or not any("0" <= c <= "9" for c in text):
        return False
    if text != "::1" and max(len(g) for g in text.split(":")) < 3:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _phone(text: str) -> bool:
    """E.164 allows at most 15 digits; fewer than 7 is a short number, not a phone number."""
    return 7 <= len(_ascii_digits(text)) <= 15


def _email(text: str) -> bool:
    """Length limits of RFC 5321 and the dot rules the regex does not enforce."""
    local, _, domain = text.rpartition("@")
    if not local or len(local) > 64 or len(text) > 254 or ".." in text or local.endswith("."):
        return False
    return all(label and label[0] != "-" and label[-1] != "-" for label in domain.split("."))


VALIDATORS: dict[str, Callable[[str], bool]] = {
    "luhn": _luhn,
    "iban": _iban,
    "ssn": _ssn,
    "ipv4": _ipv4,
    "ipv6": _ipv6,
    "phone": _phone,
    "email": _email,
}

# --- detectors and loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detector:
    """One kind of personal data: where it may be (`chars`, `max_len`), what it looks like, what it becomes."""

    name: str
    mask: str
    pattern: re.Pattern[str]
    validator: str | None
    description: str
    # The character class every match is made of: the stream holds back only a trailing run of it.
    chars: str = _ANY_CHAR
    # The longest match: bounds the stream hold-back (and so the latency) and the work per position.
    max_len: int = _DEFAULT_MAX_LEN

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ParamError(f"detector name {self.name!r}: use letters, digits and _ (starting with a letter)")
        if not isinstance(self.mask, str) or not self.mask:
            raise ParamError(f"detector {self.name}: mask must be a non-empty string")
        if not isinstance(self.pattern, re.Pattern) or not isinstance(self.pattern.pattern, str):
            raise ParamError(f"detector {self.name}: pattern must be a compiled str regex")
        if self.validator is not None and self.validator not in VALIDATORS:
            raise ParamError(
                f"detector {self.name}: unknown validator {self.validator!r} (known: {', '.join(VALIDATORS)})"
            )
        if not isinstance(self.description, str):
            raise ParamError(f"detector {self.name}: description must be a string")
        if not isinstance(self.chars, str) or not _CHAR_CLASS.fullmatch(self.chars):
            raise ParamError(f"detector {self.name}: chars must be one regex character class like [0-9 -]")
        try:
            re.compile(self.chars)
        except re.error as e:
            raise ParamError(f"detector {self.name}: chars {self.chars!r} does not compile ({e})") from e
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int):
            raise ParamError(f"detector {self.name}: max_len must be an integer")
        if not 1 <= self.max_len <= MAX_LEN_LIMIT:
            raise ParamError(f"detector {self.name}: max_len must be 1..{MAX_LEN_LIMIT}, got {self.max_len}")


def _detector(entry: Any, where: str) -> Detector:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: expected a table")
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise FormatError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    if not isinstance(entry["pattern"], str):
        raise FormatError(f"{where}: pattern must be a string")
    try:
        pattern = re.compile(entry["pattern"])
    except re.error as e:
        raise FormatError(f"{where}: pattern does not compile ({e})") from e
    validator = entry.get("validator")
    if validator == "":
        validator = None
    try:
        return Detector(
            name=entry["name"],
            mask=entry["mask"],
            pattern=pattern,
            validator=validator,
            description=entry["description"],
            chars=entry.get("chars", _ANY_CHAR),
            max_len=entry.get("max_len", _DEFAULT_MAX_LEN),
        )
    except ParamError as e:
        raise FormatError(f"{where}: {e}") from e


def _parse(text: str, source: str) -> tuple[list[Detector], bool]:
    """Detectors of one TOML document, and whether it extends the shipped set (`defaults`, true if absent)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{source}: not valid TOML ({e})") from e
    unknown = sorted(set(doc) - {"detector", "defaults"})
    if unknown:
        raise FormatError(f"{source}: unknown top-level key(s) {', '.join(unknown)} (known: defaults, detector)")
    defaults = doc.get("defaults", True)
    if not isinstance(defaults, bool):
        raise FormatError(f"{source}: defaults must be true or false")
    entries = doc.get("detector", [])
    if not isinstance(entries, list):
        raise FormatError(f"{source}: detector must be an array of tables ([[detector]])")
    detectors: list[Detector] = []
    for i, entry in enumerate(entries):
        label = entry.get("name") if isinstance(entry, dict) else None
        where = f"{source}: detector #{i + 1}" + (f" ({label!r})" if isinstance(label, str) else "")
        det = _detector(entry, where)
        if any(d.name == det.name for d in detectors):
            raise FormatError(f"{where}: duplicate name {det.name!r}")
        detectors.append(det)
    return detectors, defaults


def _shipped() -> list[Detector]:
    text = importlib.resources.files("ternlm").joinpath("pii.toml").read_text(encoding="utf-8")
    return _parse(text, "ternlm/pii.toml")[0]


def load_detectors(path: str | Path | None = None, only: Iterable[str] | None = None) -> list[Detector]:
    """The shipped detectors, or those of a TOML file, optionally only the named ones (in file order).

    A user's file extends the shipped set: an entry with a shipped name replaces it in place, other entries
    are appended. A file with `defaults = false` at the top level stands alone. `only` takes names (a string
    is read as a comma-separated list); an unknown name is a ParamError so a typo cannot switch masking off.
    """
    detectors = _shipped()
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{source}: cannot read PII detectors ({e})") from e
        extra, defaults = _parse(text, source)
        if not defaults:
            detectors = []
        for det in extra:
            names = [d.name for d in detectors]
            if det.name in names:
                detectors[names.index(det.name)] = det
            else:
                detectors.append(det)
    if only is not None:
        wanted = [n.strip() for n in only.split(",") if n.strip()] if isinstance(only, str) else list(only)
        known = [d.name for d in detectors]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ParamError(f"unknown PII detector(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        detectors = [d for d in detectors if d.name in wanted]
    return detectors


# --- masking -----------------------------------------------------------------------------------------------

# A chosen match: (start, end, detector index).
_Span = tuple[int, int, int]


class PIIFilter:
    """Masks the spans the detectors find; `stream()` gives the same masking for text that arrives in chunks."""

    def __init__(self, detectors: list[Detector] | None = None) -> None:
        self.detectors = load_detectors() if detectors is None else list(detectors)
        for det in self.detectors:
            if not isinstance(det, Detector):
                raise ParamError(f"PIIFilter takes Detector objects, got {type(det).__name__}")
        self._runs = [re.compile(d.chars + "+") for d in self.detectors]
        self._checks = [VALIDATORS[d.validator] if d.validator else None for d in self.detectors]

    @property
    def max_span(self) -> int:
        """The longest match any detector can produce (each is bounded by its `max_len`)."""
        return max((d.max_len for d in self.detectors), default=0)

    def mask(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every detected span replaced by its mask, and how many spans each detector masked."""
        counts: dict[str, int] = {}
        spans, end = self._select(text, 0, final=True)
        return self._render(text, 0, end, spans, counts), counts

    def stream(self) -> StreamMasker:
        """A masker for one streamed text: feed it chunks, then flush."""
        return StreamMasker(self)

    def _select(self, text: str, start: int, final: bool) -> tuple[list[_Span], int]:
        """Choose the matches that start at or after `start`; return them and the end of the settled text.

        `text[:start]` is context only (the last LOOKBEHIND characters emitted): lookbehinds may see it.
        With `final` the text is complete. Otherwise more may follow, and only positions whose window (see the
        module docstring) cannot change are scanned: every position in a run of a detector's `chars` that has
        already ended, and positions of the trailing run up to `len - max_len - LOOKAHEAD`. The first position
        left unscanned for any detector is the cut: everything before it is settled (the argument is in
        StreamMasker's docstring). The returned end is the cut or the end of the last match, whichever is later.
        """
        n = len(text)
        best: dict[int, tuple[int, int]] = {}  # start -> (end, detector index) of the longest candidate
        cut = n
        for k, det in enumerate(self.detectors):
            reach = det.max_len + LOOKAHEAD
            check = self._checks[k]
            for run in self._runs[k].finditer(text, start):
                a, b = run.span()
                stop = b
                if b == n and not final:
                    stop = max(a, n - reach + 1)
                    cut = min(cut, stop)
                for s in range(a, stop):
                    lo = max(s - LOOKBEHIND, 0)
                    m = det.pattern.match(text[lo : min(s + reach, b + 1)], s - lo)
                    if m is None:
                        continue
                    end = lo + m.end()
                    if end == s or end > min(s + det.max_len, b):
                        continue
                    if check is not None and not check(m.group()):
                        continue
                    if s not in best or end > best[s][0]:
                        best[s] = (end, k)
        spans: list[_Span] = []
        pos = start
        for s in sorted(best):
            if s >= cut:
                break
            if s >= pos:
                end, k = best[s]
                spans.append((s, end, k))
                pos = end
        return spans, max(cut, pos)

    def _render(self, text: str, start: int, end: int, spans: list[_Span], counts: dict[str, int]) -> str:
        parts = []
        pos = start
        for s, e, k in spans:
            det = self.detectors[k]
            parts += [text[pos:s], det.mask]
            counts[det.name] = counts.get(det.name, 0) + 1
            pos = e
        parts.append(text[pos:end])
        return "".join(parts)


class StreamMasker:
    """Masks a text that arrives in chunks, emitting as soon as no future chunk can change the result.

    `feed` returns the masked form of the text settled so far and keeps back the rest; `flush` ends the text.
    For every text and every way of cutting it, ``"".join(feed(c) for c in chunks) + flush()`` equals
    ``mask(text)[0]``, and `counts` equals the counts `mask` returns.

    Why: a candidate at position s depends only on its window (module docstring): at most LOOKBEHIND
    characters before s and ``max_len + LOOKAHEAD`` from s, cut one character past the end of the run of the
    detector's `chars` that contains s. With n characters received, that window is already complete when the
    run has ended before n, or when ``s + max_len + LOOKAHEAD <= n``: text still to come can only lengthen the
    trailing run, and the window never reaches past either limit. So every candidate that
    starts before the cut (the first position that fails this test for some detector) is exactly the
    candidate the whole text has, and ends before the cut's limits. The left-to-right choice (earliest start,
    longest, first listed) then picks the same spans up to the cut, since only candidates starting before it
    compete; if the last chosen span runs past the cut, the candidates it covers are dropped in both cases.
    The masker emits up to the cut (or that span's end) and keeps LOOKBEHIND raw characters as context.

    Latency: the text held back is the trailing run of some detector's `chars`, at most
    ``max_span + LOOKAHEAD - 1`` characters; with the shipped detectors that is usually the last word or
    number, because no shipped class holds both lower-case letters and spaces.
    """

    def __init__(self, pii: PIIFilter) -> None:
        self._filter = pii
        self._buf = ""  # the held-back text, after up to LOOKBEHIND characters of already emitted context
        self._start = 0  # where the held-back text begins in _buf
        self.counts: dict[str, int] = {}

    def feed(self, chunk: str) -> str:
        """Take the next piece of text; return the (masked) text that is now safe to emit."""
        if not chunk:
            return ""
        self._buf += chunk
        return self._emit(final=False)

    def flush(self) -> str:
        """End the text: return everything held back, masked. A later `feed` starts a new text."""
        out = self._emit(final=True)
        self._buf, self._start = "", 0
        return out

    def _emit(self, final: bool) -> str:
        spans, end = self._filter._select(self._buf, self._start, final)
        out = self._filter._render(self._buf, self._start, end, spans, self.counts)
        keep = max(end - LOOKBEHIND, 0)
        self._buf, self._start = self._buf[keep:], end - keep
        return out
