"""Constrained decoding: OpenAI `response_format` (json_object, json_schema) and forced tool calls as token masks.

llguidance compiles a JSON schema against the tokenizer and computes, at each step, which token ids may come
next (benchmarks/bench_grammar.py compares it with xgrammar and outlines-core; docs/performance.md has the
numbers). It needs no torch: masks are int32 bitmasks applied to the logits with numpy.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import llguidance
import numpy as np

from ternlm.errors import ParamError, ShapeError, TernlmError
from ternlm.tokenizer import Tokenizer

# JSON whitespace between tokens is bounded: an unbounded run lets a weak model loop on newlines until max_tokens.
# 24 characters hold a newline plus the indent of pretty-printed JSON several levels deep.
WHITESPACE = r"[ \t\n\r]{0,24}"
# Compiled grammars kept per tokenizer; a new request with the same schema copies one instead of recompiling.
GRAMMAR_CACHE_SIZE = 64
# OpenAI's rule for json_schema.name and function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Schema keywords whose values are data, not subschemas: `$ref` strings inside them are left alone.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


class _TokenizerGrammars:
    """llguidance's view of one tokenizer (about 1 s to build for a 128k vocab) and its compiled grammars."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # ternlm's Tokenizer wraps a `tokenizers.Tokenizer`; llguidance reads the same tokenizer.json text.
        hf_json = tokenizer.to_json()
        eos = sorted(tokenizer.eos_ids)
        try:
            self.lltok = llguidance.LLTokenizer(hf_json, eos_token=eos or None)
        except Exception as e:  # llguidance rejects some tokenizer kinds (e.g. WordLevel without a decoder)
            raise ParamError(f"this model's tokenizer cannot be used for constrained decoding: {e}") from e
        self.eos_ids = eos
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str, where: str) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar`: a copy of the cached compiled one (microseconds) or a new compile."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
                if compiled.is_error():
                    raise ParamError(f"{where} cannot be used for constrained decoding: {compiled.get_error()}")
                self._compiled[grammar] = compiled
                if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            return compiled.deep_copy()


_per_tokenizer: weakref.WeakKeyDictionary[Tokenizer, _TokenizerGrammars] = weakref.WeakKeyDictionary()
_per_tokenizer_lock = threading.Lock()


def _grammars_for(tokenizer: Tokenizer) -> _TokenizerGrammars:
    with _per_tokenizer_lock:
        grammars = _per_tokenizer.get(tokenizer)
        if grammars is None:
            grammars = _per_tokenizer[tokenizer] = _TokenizerGrammars(tokenizer)
        return grammars


def prepare(tokenizer: Tokenizer) -> None:
    """Build llguidance's view of `tokenizer` now (about 1 s for a 128k vocab), not in the first JSON request."""
    _grammars_for(tokenizer)


class Constraint:
    """The grammar state of one generation: mask the logits, accept the sampled token, repeat until done().

    Not thread-safe: one Constraint per request, driven by one thread at a time.
    """

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int, vocab_size: int,
                 eos_ids: list[int]) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._n = min(tokenizer_vocab, vocab_size)  # ids past this are padding rows of the model: never allowed
        self._eos = frozenset(eos_ids)
        self._bits = np.zeros((tokenizer_vocab + 31) // 32, dtype=np.int32)  # (words,) one bit per token id

    def allowed(self) -> np.ndarray:
        """Which ids may come next, as a bool array (vocab_size,). EOS is among them once the JSON is complete."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        out = np.zeros(self.vocab_size, dtype=bool)
        out[: self._n] = np.unpackbits(self._bits.view(np.uint8), count=self._n, bitorder="little").view(bool)
        return out

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place. logits: (vocab_size,)"""
        if logits.shape != (self.vocab_size,):
            raise ShapeError(f"logits must have shape ({self.vocab_size},), got {logits.shape}")
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), count=self._n, bitorder="little").view(bool)
        np.copyto(logits[: self._n], -np.inf, where=~allowed)
        logits[self._n :] = -np.inf

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; a token the grammar does not allow raises TernlmError and changes nothing."""
        token_id = int(token_id)
        if self._matcher.is_stopped() and token_id in self._eos:
            return
        if not 0 <= token_id < self._n or self._matcher.validate_tokens([token_id]) != 1:
            raise TernlmError(f"token {token_id} is not allowed by the response format at this point")
        if not self._matcher.consume_token(token_id):
            raise TernlmError(f"constrained decoding failed at token {token_id}: {self._matcher.get_error()}")

    def done(self) -> bool:
        """True once the output is complete (nothing but EOS may follow): the request can stop."""
        return self._matcher.is_stopped()


def _compile(schema: Any, tokenizer: Tokenizer, vocab_size: int, *, lenient: bool, where: str) -> Constraint:
    if not isinstance(schema, Mapping):
        raise ParamError(f"{where} must be a JSON object, got {type(schema).__name__}")
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ParamError(f"vocab_size must be a positive int, got {vocab_size!r}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            dict(schema), overrides={"whitespace_pattern": WHITESPACE, "lenient": lenient})
    except (TypeError, ValueError) as e:
        raise ParamError(f"{where} is not a valid JSON schema: {e}") from e
    grammars = _grammars_for(tokenizer)
    matcher = grammars.matcher(grammar, where)
    return Constraint(matcher, grammars.lltok.vocab_size, int(vocab_size), grammars.eos_ids)


def constraint_for(response_format: Mapping[str, Any] | None, tokenizer: Tokenizer,
                   vocab_size: int) -> Constraint | None:
    """The Constraint for an OpenAI `response_format`, or None for plain text.

    {"type": "json_object"} allows any JSON object. {"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": bool}} follows the schema; with strict true, keywords llguidance does not
    implement are an error, otherwise they are ignored. A missing schema means any JSON object. Raises
    ParamError for a malformed request or an unusable schema. The first call for a tokenizer takes about 1 s
    (128k vocab); a schema seen before costs microseconds, a new one about a millisecond or more to compile.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ParamError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile(_ANY_OBJECT, tokenizer, vocab_size, lenient=False, where="response_format")
    if kind != "json_schema":
        raise ParamError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ParamError("response_format.json_schema must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ParamError(f"response_format.json_schema.name must be 1-64 of a-z, A-Z, 0-9, _ or -, got {name!r}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ParamError(f"response_format.json_schema.strict must be a boolean, got {strict!r}")
    schema = spec.get("schema", _ANY_OBJECT)
    return _compile(schema, tokenizer, vocab_size, lenient=not strict, where="response_format.json_schema.schema")


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """Name -> parameters schema of OpenAI `tools`, checked."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ParamError(f"tools must be a list, got {type(tools).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ParamError(f"{where} must be an object with type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ParamError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ParamError(f"{where}.function.name must be 1-64 of a-z, A-Z, 0-9, _ or -, got {name!r}")
        if name in out:
            raise ParamError(f"{where}.function.name {name!r} is used by two tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ParamError(f"{where}.function.parameters must be a JSON schema object")
        out[name] = dict(params)
    return out


def _rebase_refs(schema: Any, prefix: str) -> Any:
    """Copy of `schema` whose local `$ref`s ("#/...") point into it once it sits at JSON pointer `prefix`."""
    if isinstance(schema, list):
        return [_rebase_refs(s, prefix) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + prefix + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _rebase_refs(value, prefix)
    return out


def tool_call_schema(tools: list[dict] | None, tool_choice: Any) -> dict | None:
    """JSON schema of the object {"name": ..., "arguments": {...}} that forces a tool call, or None.

    None when tool_choice is absent, "auto" or "none". "required" allows any of `tools` (anyOf when there
    are several); {"type": "function", "function": {"name": N}} forces N. `tools` are validated either way
    (ParamError). Constrain generation with it through constraint_for({"type": "json_schema",
    "json_schema": {"name": "tool_call", "schema": schema}}, ...), then read the text back with
    parse_tool_calls.
    """
    functions = _functions(tools)
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        names = list(functions)
        if not names:
            raise ParamError("tool_choice 'required' needs at least one tool in tools")
    elif isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ParamError("tool_choice must be 'auto', 'none', 'required' or "
                             '{"type": "function", "function": {"name": ...}}')
        if name not in functions:
            raise ParamError(f"tool_choice names function {name!r}, which is not in tools")
        names = [name]
    else:
        raise ParamError(f"tool_choice must be 'auto', 'none', 'required' or an object, got {tool_choice!r}")

    def call(name: str, prefix: str) -> dict:
        return {
            "type": "object",
            "properties": {"name": {"const": name},
                           "arguments": _rebase_refs(functions[name], prefix + "/properties/arguments")},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if len(names) == 1:
        return call(names[0], "")
    return {"anyOf": [call(name, f"/anyOf/{i}") for i, name in enumerate(names)]}


def _strip_fence(text: str) -> str:
    """Text inside a ```json ... ``` fence, which chat models often wrap JSON in."""
    m = re.fullmatch(r"```[A-Za-z]*\s*(.*?)\s*```", text, flags=re.DOTALL)
    return m.group(1) if m else text


def parse_tool_calls(text: str, tools: list[dict] | None) -> list[dict] | None:
    """OpenAI `tool_calls` if `text` is a tool call as JSON, else None (the text is an ordinary answer).

    Accepts {"name": <a function in tools>, "arguments" or "parameters": {...}} or a list of them, optionally
    in a ``` fence; arguments given as a JSON string are accepted too. Each call gets a fresh id.
    """
    names = {t["function"]["name"] for t in tools or ()
             if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
             and isinstance(t["function"].get("name"), str)}
    try:
        value = json.loads(_strip_fence(text.strip()))
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item["arguments"] if "arguments" in item else item.get("parameters")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)},
        })
    return calls or None
