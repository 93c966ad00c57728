"""The user-facing Model: a transformer with its tokenizer and chat template, offering logits() and generate()."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ternlm import chat, kernels
from ternlm.errors import ContextOverflowError, FormatError, ParamError, ShapeError
from ternlm.formats.native import load_cached
from ternlm.generate import GenerationEvent, generate
from ternlm.kvcache import KVCache
from ternlm.model import Transformer
from ternlm.sampling import SamplingParams
from ternlm.tokenizer import Tokenizer

# Prompts are run through the model this many tokens at a time, bounding the attention score buffers.
PREFILL_CHUNK = 512
HEAD_TYPES = ("q8_0", "q4_0", "float")
WEIGHT_LAYOUTS = ("i2", "tq1")


class Model:
    """A loaded model. One sequence at a time: concurrent calls wait for each other."""

    def __init__(self, path: Path, n_ctx: int | None = None, head: str = "q8_0", weights: str = "i2",
                 cache: bool = True) -> None:
        if head not in HEAD_TYPES:
            raise ParamError(f"head must be one of {HEAD_TYPES}, got {head!r}")
        if weights not in WEIGHT_LAYOUTS:
            raise ParamError(f"weights must be one of {WEIGHT_LAYOUTS}, got {weights!r}")
        start = time.perf_counter()
        self.path = path
        loaded = load_cached(path, head, weights, cache=cache)
        self.config, self.weights = loaded.config, loaded.weights
        self.transformer = Transformer(self.config, self.weights)
        self.tokenizer = loaded.tokenizer
        self.n_ctx = min(n_ctx or self.config.max_seq_len, self.config.max_seq_len)
        self._cache = KVCache(self.config, self.n_ctx)
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - start

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (len(tokens), vocab) float32 of one full forward pass from position 0."""
        ids = self.check_ids(tokens)
        with self._lock:
            return np.concatenate([self._forward(ids[i:i + PREFILL_CHUNK], i, last_only=False)
                                   for i in range(0, len(ids), PREFILL_CHUNK)])

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] | None = None,
                 ignore_eos: bool = False) -> Iterator[GenerationEvent]:
        """Stream a completion of `prompt` (text, or token ids used as given) as GenerationEvents."""
        ids = self._need_tokenizer().encode(prompt) if isinstance(prompt, str) else list(self.check_ids(prompt))
        return self._generate(ids, max_tokens, SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed), stop, ignore_eos)

    def chat(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> Iterator[GenerationEvent]:
        """Stream the assistant's reply to `messages` ({"role", "content"} dicts) via the chat template."""
        return self.generate(self.chat_tokens(messages), max_tokens, **kwargs)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template, ending in the generation prompt."""
        return chat.encode_chat(self._need_tokenizer(), messages, self.config.arch)

    def _generate(self, ids: list[int], max_tokens: int, sampling: SamplingParams,
                  stop: Sequence[str] | None, ignore_eos: bool) -> Iterator[GenerationEvent]:
        # generate() checks its arguments now, so bad requests fail before the first event.
        events = generate(self._step, self.tokenizer, ids, max_tokens=max_tokens, n_ctx=self.n_ctx,
                          sampling=sampling, stop=list(stop or []), stop_ids=self.stop_ids, ignore_eos=ignore_eos)
        return self._locked(events)

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end generation: the tokenizer's and the model config's end-of-sequence ids."""
        return set(self.tokenizer.eos_ids if self.tokenizer else ()) | set(self.config.eos_ids)

    def _locked(self, events: Iterator[GenerationEvent]) -> Iterator[GenerationEvent]:
        with self._lock:
            yield from events

    def _step(self, ids: list[int], start: int) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        for i in range(0, len(arr), PREFILL_CHUNK):
            logits = self._forward(arr[i:i + PREFILL_CHUNK], start + i, last_only=True)
        return logits[0]

    def _forward(self, ids: np.ndarray, start: int, last_only: bool) -> np.ndarray:
        return self.transformer.forward(ids, self._cache, start, last_only=last_only)

    def check_ids(self, tokens: Sequence[int]) -> np.ndarray:
        """The ids as int64, or ShapeError when they are empty, out of the vocabulary or longer than n_ctx."""
        ids = np.asarray(tokens)
        if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ShapeError(f"tokens must be a non-empty list of ints, got shape {ids.shape} {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ShapeError(f"token ids must lie in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        return ids.astype(np.int64)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise FormatError(f"{self.path}: no tokenizer.json; pass token ids instead of text")
        return self.tokenizer

    def info(self) -> dict:
        """Architecture, sizes and formats, for `ternlm info` and logs."""
        c, w = self.config, self.weights
        linears = [lin for layer in w.layers for lin in layer.linears()]
        ternary_bytes = sum(lin.nbytes for lin in linears)
        head_bytes = w.head.nbytes
        return {
            "path": str(self.path), "arch": c.arch, "layers": c.n_layers, "dim": c.dim, "ffn_dim": c.ffn_dim,
            "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
            "context": self.n_ctx, "activation": c.hidden_act, "rope_theta": c.rope_theta,
            "tied_embeddings": w.head is w.embed, "embedding_dtype": w.embed.dtype, "head_dtype": w.head.dtype,
            "ternary_params": sum(lin.in_features * lin.out_features for lin in linears),
            "ternary_layout": "+".join(sorted({lin.layout for lin in linears})),
            "ternary_bytes": ternary_bytes, "head_bytes": head_bytes,
            "bytes_per_token": ternary_bytes + head_bytes, "threads": kernels.get_threads(),
            "isa": kernels.active_isa(),
        }


def load(path: str | Path | None = None, *, threads: int | None = None, n_ctx: int | None = None,
         head: str = "q8_0", weights: str = "i2", cache: bool = True) -> Model:
    """Load a model directory, GGUF or ternlm (.tlm) file (default: the small model shipped with ternlm).

    head: "q8_0" stores the output head (and a tied embedding) as Q8_0, halving the bytes decode reads
    per token relative to F16; "q4_0" as Q4_0 (about 0.28x of F16, less accurate); "float" keeps the
    checkpoint's own precision.
    weights: the packed layout of the ternary layers, "i2" (2 bits/weight) or "tq1" (5 trits per byte,
    1.6 bits/weight: 20 % fewer bytes read per token; converted at load, same values and logits).
    A ternlm (.tlm) file keeps the head and layout it was written with: these options can still quantize a float
    head or repack i2 as tq1, never the reverse.
    cache: keep the converted model of a directory or GGUF file as $TERNLM_HOME/cache/*.tlm (keyed by the source
    files' sizes and times and these options) and map that on later loads, which then take a fraction of a
    second and copy no weights; False, or the environment variable TERNLM_NO_CACHE=1, reads the source each time.
    """
    if threads is not None:
        if threads < 1:
            raise ParamError(f"threads must be at least 1, got {threads}")
        kernels.set_threads(threads)
    return Model(Path(path) if path is not None else default_model_path(), n_ctx=n_ctx, head=head, weights=weights,
                 cache=cache)


def default_model_path() -> Path:
    return Path(__file__).parent / "models" / "default"
