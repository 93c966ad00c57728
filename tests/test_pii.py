"""PII masking: validators, detector files, the overlap rule, streaming that equals whole-text masking for any
chunking (hypothesis), and the false-positive/false-negative rates on tests/data/pii_labelled.jsonl."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm.errors import FormatError, ParamError, TernlmError
from ternlm.pii import LOOKAHEAD, VALIDATORS, Detector, PIIFilter, load_detectors

LABELLED = Path(__file__).parent / "data" / "pii_labelled.jsonl"
KINDS = ("email", "phone", "card", "iban", "ssn", "ipv4", "ipv6")

# Rates the default detectors must keep on the labelled set (docs/pii.md has the measured table). Each kind has
# 17-44 true spans, so one case moves its rate by 2-6 points: the per-kind bound leaves room for the two documented
# limitations a kind has at most (version numbers masked as IPv4, e-mails with an apostrophe or accents) and still
# fails when a detector breaks, which misses or over-masks most of its cases; the overall bound is the tight one.
MAX_RATE_OVERALL = 0.05
MAX_RATE_PER_KIND = 0.15


@pytest.fixture(scope="module")
def pii() -> PIIFilter:
    return PIIFilter()


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def streamed(pii: PIIFilter, chunks: list[str]) -> tuple[str, dict[str, int]]:
    sm = pii.stream()
    out = "".join(sm.feed(c) for c in chunks) + sm.flush()
    return out, sm.counts


# --- validators ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        (
            "luhn",
            ["4111 1111 1111 1111", "4242-4242-4242-4242", "378282246310005", "6011111111111117", "4222222222222"],
            ["4111 1111 1111 1112", "1234567890123456", "0000000000000000", "411111111111", "41111111111111111111"],
        ),
        (
            "iban",
            ["DE41 5001 0517 0648 2135 97", "NO9386011117947", "GB10 TEST 2030 4512 3456 78", "de41500105170648213597"],
            [
                "DE11 5001 0517 0648 2135 97",  # wrong check digits
                "DE41 5001 0517 0648 2135 9",  # a German IBAN has 22 characters
                "DE41 5001 0517 0648 2135 97 00",
                "GB19 TEST 2030 4512 3456 78",
                "NO0086011117947",  # check digits 00 are never issued
            ],
        ),
        (
            "ssn",
            ["123-45-6789", "771 20 5566", "001-01-0001", "899-99-9999"],
            ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000", "123-45-678"],
        ),
        (
            "ipv4",
            ["192.0.2.1", "0.0.0.0", "255.255.255.255", "198.51.100.7"],
            ["999.1.1.1", "256.0.0.1", "1.2.3", "01.02.03.04", "1.2.3.4.5"],
        ),
        (
            "ipv6",
            ["2001:db8::1", "::1", "fe80::1", "::ffff:192.0.2.128", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
            ["::", "a::b", "dead::beef", "::2", "1::2", "12:30:45", "2001:db8::g", "1:2:3:4:5:6:7:8:9"],
        ),
        ("phone", ["+44 20 7946 0958", "555-010-0143", "0049 30 1234567"], ["+1 23", "12-34", "+1234567890123456"]),
        (
            "email",
            ["jane.doe@example.com", "a+b@sub.example.org"],
            ["a..b@example.com", "a.@example.com", "a@-example.com", "a@example-.com", "x" * 65 + "@example.com"],
        ),
    ],
)
def test_validators(name: str, good: list[str], bad: list[str]) -> None:
    check = VALIDATORS[name]
    assert [v for v in good if not check(v)] == []
    assert [v for v in bad if check(v)] == []


# --- loading detectors ------------------------------------------------------------------------------------


def test_shipped_detectors() -> None:
    dets = load_detectors()
    assert [d.name for d in dets] == list(KINDS)
    masks = {d.name: d.mask for d in dets}
    assert masks == {
        "email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]", "ssn": "[SSN]",
        "ipv4": "[IP]", "ipv6": "[IP]",
    }  # fmt: skip
    assert all(d.description and d.max_len <= 64 for d in dets)
    assert PIIFilter(dets).max_span == 64


def test_only_selects_in_file_order() -> None:
    assert [d.name for d in load_detectors(only=["ipv4", "email"])] == ["email", "ipv4"]
    assert [d.name for d in load_detectors(only="card, ssn")] == ["card", "ssn"]
    assert load_detectors(only=[]) == []
    text, counts = PIIFilter(load_detectors(only=["email"])).mask("bob@example.com 192.0.2.1")
    assert (text, counts) == ("[EMAIL] 192.0.2.1", {"email": 1})
    with pytest.raises(ParamError, match="'emial'"):
        load_detectors(only=["email", "emial"])


NATIONAL_ID = """
[[detector]]
name = "nino"
mask = "[NINO]"
chars = "[A-Z0-9 ]"
max_len = 13
description = "UK National Insurance number"
pattern = '(?<![A-Za-z0-9])[A-Z]{2} ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D](?![A-Za-z0-9])'
"""


def test_custom_file_extends_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "extra.toml"
    path.write_text(
        NATIONAL_ID
        + """
[[detector]]
name = "email"
mask = "<mail>"
validator = "email"
description = "replaces the shipped one in place"
pattern = '[a-z]+@example[.]com'
"""
    )
    dets = load_detectors(path)
    assert [d.name for d in dets] == [*KINDS, "nino"]
    assert dets[0].mask == "<mail>" and dets[-1].chars == "[A-Z0-9 ]"
    text, counts = PIIFilter(dets).mask("NI AB 12 34 56 C, mail bob@example.com, ip 192.0.2.1")
    assert text == "NI [NINO], mail <mail>, ip [IP]"
    assert counts == {"nino": 1, "email": 1, "ipv4": 1}


def test_custom_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "alone.toml"
    path.write_text("defaults = false\n" + NATIONAL_ID)
    dets = load_detectors(str(path))
    assert [d.name for d in dets] == ["nino"]
    assert dets[0].validator is None
    assert PIIFilter(dets).mask("AB123456C and bob@example.com")[0] == "[NINO] and bob@example.com"


GOOD_ENTRY = {"name": '"x"', "mask": '"[X]"', "pattern": "'x+'", "description": '"d"'}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"validator": '"crc32"'}, "unknown validator 'crc32'"),
        ({"pattern": "'(unclosed'"}, "pattern does not compile"),
        ({"pattern": None}, "missing pattern"),
        ({"mask": None, "description": None}, "missing mask, description"),
        ({"colour": '"red"'}, "unknown field"),
        ({"chars": '"abc"'}, "chars must be one regex character class"),
        ({"chars": '"[z-a]"'}, "does not compile"),
        ({"max_len": "0"}, "max_len must be 1..256"),
        ({"max_len": '"64"'}, "max_len must be an integer"),
        ({"name": '"has space"'}, "detector name"),
        ({"mask": '""'}, "mask must be a non-empty string"),
        ({"pattern": "3"}, "pattern must be a string"),
    ],
)
def test_bad_entries_name_file_and_entry(tmp_path: Path, change: dict, message: str) -> None:
    fields = {**GOOD_ENTRY, **change}
    body = "\n".join(f"{k} = {v}" for k, v in fields.items() if v is not None)
    path = tmp_path / "bad.toml"
    first = "[[detector]]\nname = 'ok'\nmask = '[OK]'\npattern = 'ok'\ndescription = ''\n"
    path.write_text(f"{first}\n[[detector]]\n{body}\n")
    with pytest.raises(FormatError, match=re.escape(message)) as err:
        load_detectors(path)
    assert str(path) in str(err.value) and "detector #2" in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[detector]\n", "not valid TOML"),
        ("detector = 3\n", "array of tables"),
        ("defaults = 'no'\n", "defaults must be true or false"),
        ("detectors = []\n", "unknown top-level key"),
        ("detector = [3]\n", "detector #1: expected a table"),
        ("[[detector]]\nname='x'\nmask='m'\npattern='a'\ndescription=''\n" * 2, "duplicate name 'x'"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FormatError, match=re.escape(message)):
        load_detectors(path)


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read"):
        load_detectors(tmp_path / "nope.toml")
    with pytest.raises(ParamError, match="unknown validator"):
        Detector("x", "[X]", re.compile("x"), "nope", "")
    with pytest.raises(ParamError, match="Detector objects"):
        PIIFilter(["email"])  # type: ignore[list-item]
    assert issubclass(FormatError, TernlmError)


# --- masking rules ------------------------------------------------------------------------------------------


def det(name: str, pattern: str, mask: str | None = None, **kw: object) -> Detector:
    return Detector(name, mask or f"<{name}>", re.compile(pattern), None, "", **kw)  # type: ignore[arg-type]


def test_overlaps_earliest_then_longest_then_first_listed() -> None:
    f = PIIFilter([det("short", "abc"), det("long", "abcde"), det("late", "cdefg"), det("same", "abc")])
    assert f.mask("xabcdefg abc") == ("x<long>fg <short>", {"long": 1, "short": 1})
    assert PIIFilter([det("late", "cdefg"), det("short", "abc")]).mask("xabcdefg")[0] == "x<short>defg"


def test_validator_rejection_leaves_text(pii: PIIFilter) -> None:
    text = "4111 1111 1111 1112 / DE11 5001 0517 0648 2135 97 / 000-12-3456 / 999.1.1.1"
    assert pii.mask(text) == (text, {})


def test_neighbouring_numbers(pii: PIIFilter) -> None:
    assert pii.mask("4111111111111111 5555555555554444")[0] == "[CARD] [CARD]"
    assert pii.mask("123-45-6789 219-55-1234")[0] == "[SSN] [SSN]"
    grouped = "4111 1111 1111 1111 5555 5555 5555 4444"  # one long grouped number or two cards: left alone
    assert pii.mask(grouped) == (grouped, {})
    assert pii.mask("41111111111111112") == ("41111111111111112", {})  # no shorter match is tried after Luhn fails


def test_masks_are_not_masked_again() -> None:
    shout = det("shout", "[A-Z]{4,}", "[SHOUT]")
    f = PIIFilter([*load_detectors(only=["email"]), shout])
    assert f.mask("write to bob@example.com LOUD") == ("write to [EMAIL] [SHOUT]", {"email": 1, "shout": 1})


def test_masking_is_idempotent(pii: PIIFilter) -> None:
    for row in labelled():
        once = pii.mask(row["text"])[0]
        assert pii.mask(once) == (once, {}), row["text"]


def test_unicode_digits_are_not_numbers(pii: PIIFilter) -> None:
    text = "٤١١١ ١١١١ ١١١١ ١١١١ and ４１１１１１１１１１１１１１１１"
    assert pii.mask(text) == (text, {})


# --- streaming -----------------------------------------------------------------------------------------------


def test_number_split_across_chunks(pii: PIIFilter) -> None:
    sm = pii.stream()
    first = sm.feed("card 4111 1111")
    assert first == "card"  # the digits may still grow into a card number
    rest = sm.feed(" 1111 1111") + sm.feed(", thanks") + sm.flush()
    assert first + rest == "card [CARD], thanks"
    assert sm.counts == {"card": 1}


def test_stream_emits_early(pii: PIIFilter) -> None:
    sm = pii.stream()
    assert sm.feed("Hello there, ") == "Hello there,"  # a space may still join digits: held
    assert sm.feed("my friend") == " my "  # only the last word is held back
    assert sm.feed("! Call (555) 010-") == "friend! Call"
    assert sm.feed("0143 now") == " [PHONE] "
    assert sm.flush() == "now"
    assert sm.feed("again") == "" and sm.flush() == "again"  # a new text after flush


def test_stream_hold_back_is_bounded(pii: PIIFilter) -> None:
    sm = pii.stream()
    digits = "1234567890" * 50
    out = "".join(sm.feed(c) for c in digits)
    assert len(digits) - len(out) <= pii.max_span + LOOKAHEAD - 1
    assert out + sm.flush() == digits


def test_stream_char_by_char_on_labelled_set(pii: PIIFilter) -> None:
    text = "\n".join(row["text"] for row in labelled())
    assert streamed(pii, list(text)) == pii.mask(text)


PIECES = [
    "bob.smith@example.com", "A@EXAMPLE.ORG", "+44 20 7946 0958", "(555) 010-0143", "555-010-0143", "030 12345678",
    "01 99 00 12 34", "4111 1111 1111 1111", "4111111111111111", "378282246310005", "DE75 5001 0517 0648 2135 97",
    "NO9386011117947", "123-45-6789", "192.0.2.1", "10.0.0.255", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1",
    "4111 1111 1111 1112", "000-12-3456", "999.1.1.1", "2024-01-15", "12:30:45", "v1.2.3.4", "user@localhost",
    "std::vector", "$1,234.56", " ", " ", "  ", ", ", ". ", "\n", "-", ".", ":", "@", "+", "(", ")", "/", "1", "42",
    "word", "The ", "x", "CALL ", "é",
]  # fmt: skip
ALPHABET = "0123456789 .-:@+()/abcdefxyzABCDEZ_\n"


@st.composite
def text_and_chunks(draw: st.DrawFn) -> tuple[str, list[str]]:
    parts = draw(st.lists(st.sampled_from(PIECES) | st.text(ALPHABET, max_size=6), max_size=14))
    text = "".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(text_and_chunks())
def test_stream_equals_mask_for_any_split(pii: PIIFilter, case: tuple[str, list[str]]) -> None:
    text, chunks = case
    assert streamed(pii, chunks) == pii.mask(text)


@settings(max_examples=100, deadline=None)
@given(text_and_chunks())
def test_stream_equals_mask_with_any_char_detector(case: tuple[str, list[str]]) -> None:
    """A detector without `chars` (any character, max_len bounded) falls back to a fixed window, still exact."""
    f = PIIFilter([det("words", r"(?<!\w)[a-f]+ [a-f]+(?!\w)", max_len=12), *load_detectors(only=["card", "ipv6"])])
    text, chunks = case
    assert streamed(f, chunks) == f.mask(text)


# --- rates on the labelled set ------------------------------------------------------------------------------


def test_labelled_set_is_well_formed() -> None:
    rows = labelled()
    assert len(rows) >= 150
    for row in rows:
        spans = sorted((s["start"], s["end"]) for s in row["spans"])
        assert all(0 <= a < b <= len(row["text"]) for a, b in spans), row
        assert all(b <= c for (_, b), (c, _) in itertools.pairwise(spans)), row
        assert {s["kind"] for s in row["spans"]} <= set(KINDS), row
    kinds = [s["kind"] for row in rows for s in row["spans"]]
    assert all(kinds.count(k) >= 10 for k in KINDS)
    assert sum(not row["spans"] for row in rows) >= 80  # texts that must come back unchanged


def rates(pii: PIIFilter) -> dict[str, tuple[int, int, int, int]]:
    """Per kind: (true spans, missed, masked spans, masked spans that overlap no true span of that kind).

    A true span is caught when every character of it is inside masked spans (whichever detector masked them).
    """
    table = {k: [0, 0, 0, 0] for k in KINDS}
    for row in labelled():
        spans, _ = pii._select(row["text"], 0, final=True)
        masked = [(s, e, pii.detectors[k].name) for s, e, k in spans]
        covered = {i for s, e, _ in masked for i in range(s, e)}
        for true in row["spans"]:
            table[true["kind"]][0] += 1
            table[true["kind"]][1] += not set(range(true["start"], true["end"])) <= covered
        for s, e, kind in masked:
            table[kind][2] += 1
            table[kind][3] += not any(t["kind"] == kind and t["start"] < e and s < t["end"] for t in row["spans"])
    return {k: (v[0], v[1], v[2], v[3]) for k, v in table.items()}


def test_rates(pii: PIIFilter) -> None:
    table = rates(pii)
    total = tuple(map(sum, zip(*table.values(), strict=True)))
    print("\n| kind | true spans | missed | FN rate | masked spans | false | FP rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, (n, fn, m, fp) in [*table.items(), ("all", total)]:
        print(f"| {kind} | {n} | {fn} | {fn / max(n, 1):.1%} | {m} | {fp} | {fp / max(m, 1):.1%} |")
    n, fn, m, fp = total
    assert fn / n <= MAX_RATE_OVERALL and fp / m <= MAX_RATE_OVERALL
    for kind, (n, fn, m, fp) in table.items():
        assert fn / n <= MAX_RATE_PER_KIND, kind
        assert fp / max(m, 1) <= MAX_RATE_PER_KIND, kind
