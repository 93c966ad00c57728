"""The transformer forward pass of BitNet b1.58 and ternary Llama models, in numpy around ternary kernels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ternlm import kernels
from ternlm.config import ModelConfig
from ternlm.errors import ParamError, ShapeError
from ternlm.kvcache import KVCache
from ternlm.layers import LAYOUTS, FloatMatrix, Q4Matrix, Q8Matrix, Rope, TernaryLinear, rms_norm

PREFILL_BLOCK = 64  # queries per block of prefill attention: the unit of work of its threads
_POOLS: dict[int, ThreadPoolExecutor] = {}  # thread count -> the threads prefill attention runs on
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of its parent's threads


def parallel(fn: Callable[..., None], items: list[tuple]) -> None:
    """fn(*item) for every item, on as many threads as the kernels use: numpy releases the GIL in matmuls and
    ufuncs, so numpy work split this way runs on every core (BLAS stays single-threaded, see _forward). Items
    go in the order given: put the costliest first."""
    n = min(kernels.get_threads(), len(items))
    if n <= 1:
        for item in items:
            fn(*item)
        return
    pool = _POOLS.get(n) or _POOLS.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="ternlm-attn"))
    for _ in pool.map(lambda item: fn(*item), items):  # re-raises a worker's exception here
        pass


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (dim,) float32
    ffn_norm: np.ndarray  # (dim,)
    attn_sub_norm: np.ndarray | None  # (q_dim,): BitNet only, before o_proj
    ffn_sub_norm: np.ndarray | None  # (ffn_dim,): BitNet only, before down_proj
    qkv: TernaryLinear  # q, k, v projections stacked: (q_dim + 2 kv_dim, dim)
    o: TernaryLinear
    gate_up: TernaryLinear  # gate and up stacked: (2 ffn_dim, dim)
    down: TernaryLinear

    def linears(self) -> list[TernaryLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]


@dataclass
class ModelWeights:
    embed: FloatMatrix | Q8Matrix | Q4Matrix  # (vocab, dim)
    norm: np.ndarray  # (dim,)
    head: FloatMatrix | Q8Matrix | Q4Matrix  # (vocab, dim): the embedding itself when tied
    layers: list[LayerWeights]

    def quantize_head(self, kind: str = "q8_0") -> None:
        """Store the output head as Q8_0 or Q4_0 (kind "q8_0" | "q4_0"), and the embedding with it when
        they are tied. A head that is already quantized, or whose width is not a multiple of 32, stays."""
        cls = {"q8_0": Q8Matrix, "q4_0": Q4Matrix}.get(kind)
        if cls is None:
            raise ParamError(f"head quantization must be \"q8_0\" or \"q4_0\", got {kind!r}")
        if not isinstance(self.head, FloatMatrix) or self.head.shape[1] % 32:
            return
        tied = self.head is self.embed
        self.head = cls.from_float(self.head)
        if tied:
            self.embed = self.head

    def streamed(self) -> list:
        """The layers whose kernels stream weights, in the order a forward pass runs them (head last)."""
        return [m for lw in self.layers for m in lw.linears()] + [self.head]

    def convert_ternary(self, layout: str) -> None:
        """Repack every ternary layer into layout "i2" (2 bits/weight) or "tq1" (1.6 bits/weight)."""
        if layout not in LAYOUTS:
            raise ParamError(f"ternary weight layout must be one of {LAYOUTS}, got {layout!r}")
        for lw in self.layers:
            lw.qkv, lw.o, lw.gate_up, lw.down = (lin.to_layout(layout) for lin in lw.linears())


class Transformer:
    """Runs tokens through the model; knows nothing about files, sampling or text."""

    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        self.config = config
        self.w = weights
        self.rope = Rope(config.head_dim, config.rope_theta, config.max_seq_len)
        self.scale = np.float32(config.head_dim ** -0.5)
        # Each weight kernel names the weights of the one after it (the last layer's: the head's; the head's:
        # the first layer's, for the next token): a worker thread reads them ahead while the small ops between
        # two matmuls run, when memory would otherwise sit idle.
        order = weights.streamed()
        for m, after in zip(order, order[1:] + order[:1], strict=True):
            m.read_next = after.streamed

    def forward(self, tokens: np.ndarray, cache: KVCache, start: int, last_only: bool = False) -> np.ndarray:
        """Logits (t, vocab) for tokens (t,) at positions start..; with last_only, (1, vocab) for the last."""
        return self._forward(tokens, [cache], [start], [len(tokens)], last_only)

    def decode_batch(self, tokens: np.ndarray, caches: list[KVCache], positions: list[int]) -> np.ndarray:
        """Logits (b, vocab) for one new token of each of b sequences, token j at positions[j] of caches[j].

        Decode reads every weight once per step whatever the batch, so b sequences cost little more than one.
        """
        if not len(tokens) == len(caches) == len(positions):
            raise ShapeError(f"decode_batch: {len(tokens)} tokens, {len(caches)} caches and {len(positions)} "
                             "positions must be as many")
        return self._forward(tokens, caches, positions, [1] * len(tokens), last_only=False)

    def forward_batch(self, chunks: list[np.ndarray], caches: list[KVCache], starts: list[int]) -> np.ndarray:
        """Logits (b, vocab) of the last token of each of b sequences: chunk j (t_j >= 1 tokens) at positions
        starts[j].. of caches[j]. The server mixes a prompt chunk into its decode steps this way, so the
        prompt costs no pass over the weights of its own."""
        if not len(chunks) == len(caches) == len(starts) or not chunks or any(len(c) == 0 for c in chunks):
            raise ShapeError(f"forward_batch: {len(chunks)} chunks (none empty), {len(caches)} caches and "
                             f"{len(starts)} starts must be as many, at least one")
        return self._forward(np.concatenate(chunks), caches, starts, [len(c) for c in chunks], last_only=True)

    def _forward(self, tokens: np.ndarray, caches: list[KVCache], starts: list[int], lengths: list[int],
                 last_only: bool) -> np.ndarray:
        # Sequence j owns lengths[j] consecutive rows of x. Prefill attention runs numpy matmuls; BLAS worker
        # threads would spin on the cores that the ternary kernels' threads need (measured: 2-thread prefill
        # no faster than 1-thread).
        with threadpool_limits(1, user_api="blas") if max(lengths) > 1 else contextlib.nullcontext():
            x = self.w.embed.rows(tokens)  # (t, dim)
            for i, layer in enumerate(self.w.layers):
                x = self.block(x, layer, i, caches, starts, lengths)
        if last_only:
            x = x[np.cumsum(lengths) - 1]
        return self.w.head(rms_norm(x, self.w.norm, self.config.norm_eps))

    def block(self, x: np.ndarray, w: LayerWeights, i: int, caches: list[KVCache], starts: list[int],
              lengths: list[int]) -> np.ndarray:
        h = x + self.attention(x, w, i, caches, starts, lengths)
        return h + self.mlp(h, w)

    def attention(self, x: np.ndarray, w: LayerWeights, i: int, caches: list[KVCache], starts: list[int],
                  lengths: list[int]) -> np.ndarray:
        c = self.config
        qkv = w.qkv(x, w.attn_norm, c.norm_eps)  # RMSNorm, then the projection: (t, q_dim + 2 kv_dim)
        # Sequences with one new token: RoPE, cache write and attention in one C call for all of them.
        single = [j for j, n in enumerate(lengths) if n == 1]
        if len(single) == len(lengths):
            out = self.attention_decode(qkv, i, caches, starts)
        else:
            out = np.empty((len(qkv), c.q_dim), np.float32)
            first = np.cumsum([0, *lengths[:-1]])
            if single:
                out[first[single]] = self.attention_decode(qkv[first[single]], i, [caches[j] for j in single],
                                                           [starts[j] for j in single])
            for j, (row, n) in enumerate(zip(first, lengths, strict=True)):
                if n > 1:
                    out[row:row + n] = self.attention_prefill(qkv[row:row + n], i, caches[j], starts[j])
        return w.o(out, w.attn_sub_norm, c.norm_eps)

    def attention_decode(self, qkv: np.ndarray, i: int, caches: list[KVCache], starts: list[int]) -> np.ndarray:
        return kernels.attention_decode_batch(qkv, [cache.k[i] for cache in caches], [cache.v[i] for cache in caches],
                                              starts, self.rope.cos, self.rope.sin, self.config.n_heads,
                                              self.scale, [cache.scores for cache in caches])

    def attention_prefill(self, qkv: np.ndarray, i: int, cache: KVCache, start: int) -> np.ndarray:
        """Causal attention of t tokens at positions start.. with numpy matmuls; returns (t, q_dim)."""
        c = self.config
        t, hd = len(qkv), c.head_dim
        q, k, v = np.split(qkv, [c.q_dim, c.q_dim + c.kv_dim], axis=1)
        k = self.rope(k.reshape(t, c.n_kv_heads, hd).transpose(1, 0, 2), start)
        v = v.reshape(t, c.n_kv_heads, hd).transpose(1, 0, 2)
        keys, values = cache.store(i, start, k, v)  # (kv_heads, s, head_dim), s = start + t

        # Grouped-query attention: the query heads sharing a KV head are stacked along the token axis.
        # Queries go in blocks, each against only the keys it can see: causal attention does half the
        # work of a full square, and the score buffers stay small. Each (KV head, block) is one item of
        # work for the threads, from RoPE of its queries to its slice of the output; the blocks that see
        # the most keys go first.
        group = c.n_heads // c.n_kv_heads
        out = np.empty((t, c.q_dim), np.float32)

        def block(g: int, b0: int) -> None:
            b1 = min(b0 + PREFILL_BLOCK, t)
            s = start + b1  # keys visible to the block's last query
            heads = slice(g * group * hd, (g + 1) * group * hd)
            qb = self.rope(q[b0:b1, heads].reshape(b1 - b0, group, hd).transpose(1, 0, 2), start + b0)
            scores = qb.reshape(group * (b1 - b0), hd) @ keys[g, :s].T  # (group * tokens, s)
            kernels.causal_softmax(scores, b1 - b0, start + b0 + 1, self.scale)  # position start+j sees 0..start+j
            weighted = scores @ values[g, :s]  # (group * tokens, hd)
            out[b0:b1, heads] = weighted.reshape(group, b1 - b0, hd).transpose(1, 0, 2).reshape(b1 - b0, -1)

        parallel(block, [(g, b0) for b0 in reversed(range(0, t, PREFILL_BLOCK)) for g in range(c.n_kv_heads)])
        return out

    def mlp(self, x: np.ndarray, w: LayerWeights) -> np.ndarray:
        eps = self.config.norm_eps
        z = kernels.glu(w.gate_up(x, w.ffn_norm, eps), self.config.hidden_act)  # (t, ffn_dim)
        return w.down(z, w.ffn_sub_norm, eps)
