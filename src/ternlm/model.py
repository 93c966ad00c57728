"""The transformer forward pass of BitNet b1.58 and ternary Llama models, in numpy around ternary kernels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ternlm.config import ModelConfig
from ternlm.kvcache import KVCache
from ternlm.layers import FloatMatrix, Rope, TernaryLinear, quantize, rms_norm


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (dim,) float32
    ffn_norm: np.ndarray  # (dim,)
    attn_sub_norm: np.ndarray | None  # (q_dim,): BitNet only, before o_proj
    ffn_sub_norm: np.ndarray | None  # (ffn_dim,): BitNet only, before down_proj
    q: TernaryLinear
    k: TernaryLinear
    v: TernaryLinear
    o: TernaryLinear
    gate: TernaryLinear
    up: TernaryLinear
    down: TernaryLinear

    def linears(self) -> list[TernaryLinear]:
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]


@dataclass
class ModelWeights:
    embed: FloatMatrix  # (vocab, dim)
    norm: np.ndarray  # (dim,)
    head: FloatMatrix  # (vocab, dim): the embedding itself when tied
    layers: list[LayerWeights]


class Transformer:
    """Runs tokens through the model; knows nothing about files, sampling or text."""

    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        self.config = config
        self.w = weights
        self.rope = Rope(config.head_dim, config.rope_theta, config.max_seq_len)
        self.scale = np.float32(config.head_dim ** -0.5)

    def forward(self, tokens: np.ndarray, cache: KVCache, start: int, last_only: bool = False) -> np.ndarray:
        """Logits (t, vocab) for tokens (t,) at positions start..; with last_only, (1, vocab) for the last."""
        x = self.w.embed.rows(tokens)  # (t, dim)
        for i, layer in enumerate(self.w.layers):
            x = self.block(x, layer, i, cache, start)
        if last_only:
            x = x[-1:]
        return self.w.head(rms_norm(x, self.w.norm, self.config.norm_eps))

    def block(self, x: np.ndarray, w: LayerWeights, i: int, cache: KVCache, start: int) -> np.ndarray:
        eps = self.config.norm_eps
        h = x + self.attention(rms_norm(x, w.attn_norm, eps), w, i, cache, start)
        return h + self.mlp(rms_norm(h, w.ffn_norm, eps), w)

    def attention(self, x: np.ndarray, w: LayerWeights, i: int, cache: KVCache, start: int) -> np.ndarray:
        c = self.config
        t = x.shape[0]
        xq = quantize(x)  # q, k and v read one quantization of x
        q = self.rope(w.q(xq).reshape(t, c.n_heads, c.head_dim).transpose(1, 0, 2), start)
        k = self.rope(w.k(xq).reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2), start)
        v = w.v(xq).reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        keys, values = cache.store(i, start, k, v)  # (kv_heads, s, head_dim), s = start + t

        # Grouped-query attention: the query heads sharing a KV head are stacked along the token axis.
        group = c.n_heads // c.n_kv_heads
        s = keys.shape[1]
        scores = (q.reshape(c.n_kv_heads, group * t, c.head_dim) @ keys.transpose(0, 2, 1)) * self.scale
        scores = scores.reshape(c.n_kv_heads, group, t, s)
        if t > 1:  # causal mask: position start+j sees keys 0..start+j
            scores = np.where(np.arange(s) <= start + np.arange(t)[:, None], scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = (scores / scores.sum(axis=-1, keepdims=True)).reshape(c.n_kv_heads, group * t, s)
        out = (probs @ values).reshape(c.n_heads, t, c.head_dim).transpose(1, 0, 2).reshape(t, c.q_dim)
        if w.attn_sub_norm is not None:
            out = rms_norm(out, w.attn_sub_norm, c.norm_eps)
        return w.o(quantize(out))

    def mlp(self, x: np.ndarray, w: LayerWeights) -> np.ndarray:
        xq = quantize(x)  # gate and up read one quantization of x
        gate, up = w.gate(xq), w.up(xq)
        if self.config.hidden_act == "relu2":
            z = np.square(np.maximum(gate, 0.0)) * up
        else:  # silu
            with np.errstate(over="ignore"):  # exp(-gate) may overflow to inf: silu is then -0, as it should be
                z = gate / (np.float32(1.0) + np.exp(-gate)) * up
        if w.ffn_sub_norm is not None:
            z = rms_norm(z, w.ffn_sub_norm, self.config.norm_eps)
        return w.down(quantize(z))
