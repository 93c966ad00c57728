"""Constrained decoding: random samplers held to JSON / a schema, masks, errors, and the tool-call helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ternlm.errors import ParamError, ShapeError, TernlmError
from ternlm.grammar import Constraint, constraint_for, parse_tool_calls, prepare, tool_call_schema
from ternlm.tokenizer import Tokenizer
from tiny_models import toy_model_path

TOY = toy_model_path()  # a byte-level tokenizer: one token per digit
TOY_VOCAB = json.loads((TOY / "config.json").read_text())["vocab_size"]  # 320 rows for 259 ids

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"],
    "additionalProperties": False,
    "$defs": {"Zone": {"type": "object", "properties": {"utc_offset": {"type": "integer"}},
                       "required": ["utc_offset"], "additionalProperties": False}}}}}


@pytest.fixture(scope="module")
def toy() -> Tokenizer:
    """The toy model's tokenizer: 256 byte ids + 3 specials, under a 320-row embedding."""
    return Tokenizer.from_dir(TOY)


def sample(c: Constraint, tok: Tokenizer, vocab: int, seed: int, max_steps: int = 4000) -> tuple[str, int]:
    """Drive `c` with random logits until done(); (text, steps). Stops early on EOS, as the engine would."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for step in range(max_steps):
        logits = rng.standard_normal(vocab).astype(np.float32) * 3
        c.mask_logits(logits)
        p = np.exp(logits - logits.max())
        token = int(rng.choice(vocab, p=p / p.sum()))
        c.accept(token)
        if token in tok.eos_ids:
            assert c.done()
            return tok.decode(ids), step
        ids.append(token)
        if c.done():
            return tok.decode(ids), step
    raise AssertionError(f"not done after {max_steps} tokens: {tok.decode(ids)[:200]!r}")


def check_person(value: object) -> None:
    assert isinstance(value, dict) and set(value) <= set(PERSON["properties"])
    assert {"name", "age", "role"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert value["role"] in ("admin", "user", "guest")
    tags = value.get("tags", [])
    assert isinstance(tags, list) and len(tags) <= 3 and all(isinstance(t, str) and len(t) <= 8 for t in tags)


@pytest.mark.parametrize("seed", range(6))
def test_json_object_random_sampler_gives_valid_json(byte_tokenizer: Tokenizer, seed: int) -> None:
    vocab = byte_tokenizer.vocab_size
    c = constraint_for({"type": "json_object"}, byte_tokenizer, vocab)
    text, _ = sample(c, byte_tokenizer, vocab, seed)
    assert isinstance(json.loads(text), dict), text
    assert c.done()


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_random_sampler_validates(toy: Tokenizer, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    c = constraint_for(fmt, toy, TOY_VOCAB)
    text, _ = sample(c, toy, TOY_VOCAB, seed)
    check_person(json.loads(text))


def test_complete_output_allows_only_eos_and_stays_done(toy: Tokenizer) -> None:
    c = constraint_for({"type": "json_object"}, toy, TOY_VOCAB)
    assert not c.done()
    assert not c.allowed()[sorted(toy.eos_ids)].any()  # EOS only once the JSON is complete
    for t in toy.encode('{"a": [1, 2.5, "x"]}', add_bos=False):
        c.accept(t)
    assert c.done()
    assert set(np.flatnonzero(c.allowed())) == toy.eos_ids
    eos = min(toy.eos_ids)
    c.accept(eos)
    c.accept(eos)
    assert c.done()


def test_cached_grammar_gives_independent_states(toy: Tokenizer) -> None:
    prepare(toy)
    first = constraint_for({"type": "json_object"}, toy, TOY_VOCAB)
    for t in toy.encode("{}", add_bos=False):
        first.accept(t)
    second = constraint_for({"type": "json_object"}, toy, TOY_VOCAB)  # same schema: a cached copy
    assert first.done() and not second.done()
    (brace,) = toy.encode("{", add_bos=False)
    assert second.allowed()[brace]


def test_mask_never_allows_padding_rows(toy: Tokenizer) -> None:
    assert toy.vocab_size < TOY_VOCAB
    c = constraint_for({"type": "json_object"}, toy, TOY_VOCAB)
    for t in toy.encode('{"k": "', add_bos=False):
        c.accept(t)
    logits = np.zeros(TOY_VOCAB, dtype=np.float32)
    c.mask_logits(logits)
    assert np.isneginf(logits[toy.vocab_size :]).all()
    # Inside a string: printable ASCII and UTF-8 lead bytes (continuation bytes and controls are not).
    assert np.isfinite(logits[: toy.vocab_size]).sum() > 140
    with pytest.raises(TernlmError):
        c.accept(TOY_VOCAB - 1)
    with pytest.raises(ShapeError):
        c.mask_logits(np.zeros(toy.vocab_size, dtype=np.float32))


def test_disallowed_token_raises_and_leaves_state(toy: Tokenizer) -> None:
    c = constraint_for({"type": "json_object"}, toy, TOY_VOCAB)
    (x,) = toy.encode("x", add_bos=False)
    with pytest.raises(TernlmError, match="not allowed"):
        c.accept(x)
    with pytest.raises(TernlmError):
        c.accept(min(toy.eos_ids))  # EOS before the object is complete
    for t in toy.encode("{}", add_bos=False):  # the failed accepts changed nothing
        c.accept(t)
    assert c.done()


def test_mask_matches_accept(toy: Tokenizer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    c = constraint_for(fmt, toy, TOY_VOCAB)
    for t in toy.encode('{"name": "Al", "age": ', add_bos=False):
        c.accept(t)
    whitespace = {toy.encode(w, add_bos=False)[0] for w in " \t\n\r"}
    allowed = set(np.flatnonzero(c.allowed()).tolist()) - whitespace
    assert allowed == {toy.encode(d, add_bos=False)[0] for d in "0123456789"}  # minimum 0: no "-"
    (quote,) = toy.encode('"', add_bos=False)
    with pytest.raises(TernlmError):
        c.accept(quote)


@pytest.mark.parametrize("fmt, match", [
    ("json", "must be an object"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "objekt"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}, "nope"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes", "schema": {}}}, "strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                             "schema": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
])
def test_bad_response_format_raises_param_error(toy: Tokenizer, fmt: object, match: str) -> None:
    with pytest.raises(ParamError, match=match):
        constraint_for(fmt, toy, TOY_VOCAB)  # type: ignore[arg-type]


def test_text_and_lenient_formats(toy: Tokenizer) -> None:
    assert constraint_for(None, toy, TOY_VOCAB) is None
    assert constraint_for({"type": "text"}, toy, TOY_VOCAB) is None
    lenient = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    assert constraint_for(lenient, toy, TOY_VOCAB) is not None
    no_schema = constraint_for({"type": "json_schema", "json_schema": {"name": "x"}}, toy, TOY_VOCAB)
    (brace,) = toy.encode("{", add_bos=False)
    assert no_schema is not None and np.flatnonzero(no_schema.allowed()).tolist() == [brace]


def test_whitespace_runs_are_bounded(toy: Tokenizer) -> None:
    c = constraint_for({"type": "json_object"}, toy, TOY_VOCAB)
    c.accept(toy.encode("{", add_bos=False)[0])
    (nl,) = toy.encode("\n", add_bos=False)
    with pytest.raises(TernlmError):
        for _ in range(100):
            c.accept(nl)


def test_tool_call_schema_shapes() -> None:
    assert tool_call_schema([WEATHER], None) is None
    assert tool_call_schema([WEATHER], "auto") is None
    assert tool_call_schema([WEATHER], "none") is None
    one = tool_call_schema([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert one is not None and one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == WEATHER["function"]["parameters"]
    both = tool_call_schema([WEATHER, TIME], "required")
    assert both is not None and [o["properties"]["name"]["const"] for o in both["anyOf"]] == ["get_weather", "get_time"]
    # $refs of a function's parameters are rebased to where the parameters now sit.
    zone = both["anyOf"][1]["properties"]["arguments"]["properties"]["zone"]
    assert zone == {"$ref": "#/anyOf/1/properties/arguments/$defs/Zone"}
    no_params = {"type": "function", "function": {"name": "ping"}}
    assert tool_call_schema([no_params], "required")["properties"]["arguments"]["type"] == "object"


@pytest.mark.parametrize("tools, choice, match", [
    ([{"type": "code", "function": {"name": "f"}}], "auto", "type 'function'"),
    ([{"type": "function"}], "auto", "function must be an object"),
    ([{"type": "function", "function": {"name": 3}}], "auto", "name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "auto", "parameters"),
    ([WEATHER, WEATHER], "required", "two tools"),
    ("tools", "auto", "list"),
    ([], "required", "at least one"),
    (None, "required", "at least one"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ([WEATHER], {"type": "function"}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
])
def test_tool_validation(tools: object, choice: object, match: str) -> None:
    with pytest.raises(ParamError, match=match):
        tool_call_schema(tools, choice)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_forced_tool_call_round_trip(toy: Tokenizer, seed: int) -> None:
    tools = [WEATHER, TIME]
    schema = tool_call_schema(tools, "required")
    fmt = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
    text, _ = sample(constraint_for(fmt, toy, TOY_VOCAB), toy, TOY_VOCAB, seed)
    calls = parse_tool_calls(text, tools)
    assert calls is not None and len(calls) == 1, text
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
    else:
        assert call["function"]["name"] == "get_time" and type(args["zone"]["utc_offset"]) is int


def test_parse_tool_calls_forms() -> None:
    tools = [WEATHER, TIME]
    calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}', tools)
    assert calls is not None and calls[0]["function"] == {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}
    fenced = '```json\n[{"name": "get_time", "parameters": {"zone": {"utc_offset": 2}}},' \
             ' {"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}]\n```'
    calls = parse_tool_calls(fenced, tools)
    assert calls is not None and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Zürich"}
    assert calls[0]["id"] != calls[1]["id"]
    for text in ("Paris is sunny.", '{"name": "launch", "arguments": {}}', '{"name": "get_time"}',
                 '{"name": "get_time", "arguments": [1]}', "[]", '{"city": "Paris"}', "{"):
        assert parse_tool_calls(text, tools) is None, text
    assert parse_tool_calls('{"name": "get_time", "arguments": {}}', None) is None
