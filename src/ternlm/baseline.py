"""ternlm's full-precision baseline: the same transformer with float weights instead of ternary ones.

What `ternlm bench` divides by. Only the linear layers change: the forward pass (``model.Transformer``),
attention, KV cache, norms and RoPE are ternlm's own, so the speedup measures the weight format and its
matmul, nothing else.

Precisions (``PRECISIONS``):
- "f16" (the default, what the published BitNet comparisons ran: llama.cpp FP16): weights stored as IEEE
  float16, 2 bytes each, multiplied by ternlm's AVX-512 float kernel (``kernels.float_matmul``), which widens
  them to float32 in registers and accumulates in float32. This CPU has no float16 arithmetic (Zen 5 lacks
  AVX512-FP16), so float32 is the precision it computes in, as llama.cpp's F16 path does on x86.
  Measured here on a 12032 x 4096 matrix: decode (1 token) 44 GB/s of weights at 2 threads, at the memory
  bandwidth; prefill (128 tokens) 162 GFLOP/s, as fast as OpenBLAS sgemm on float32 weights, and both much
  faster than numpy's float16 matmul (no BLAS) or converting float16 to float32 for sgemm (numpy's
  conversion runs at about 1 GB/s).
- "bf16": bfloat16 weights, the same kernel and float32 arithmetic (the checkpoint dtype of 2B4T).
- "f32": float32 weights multiplied by numpy, i.e. OpenBLAS sgemv/sgemm with as many threads as ternlm's
  kernels. Twice the bytes of f16, so about half its decode speed: shown for reference, not the default.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import ThreadpoolController

from ternlm import kernels, ternary
from ternlm.config import ModelConfig
from ternlm.errors import ParamError
from ternlm.layers import FloatMatrix, Q4Matrix, Q8Matrix, TernaryLinear, rms_norm
from ternlm.model import LayerWeights, ModelWeights, Transformer

PRECISIONS = ("f16", "bf16", "f32")
BYTES_PER_WEIGHT = {"f16": 2, "bf16": 2, "f32": 4}
CHUNK_ROWS = 1024  # rows dequantized at a time: bounds the temporaries of a big matrix

_blas = ThreadpoolController()


class BlasLinear:
    """A float32 weight (out, in) multiplied by numpy/OpenBLAS with ternlm's thread count.

    ``Transformer.forward`` limits BLAS to one thread around a prefill (for its own attention); the weight
    matmul here takes the kernels' thread count back for its own call.
    """

    dtype = "F32"
    read_next: np.ndarray | None = None  # unused: numpy's matmul reads nothing ahead

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = np.ascontiguousarray(weight, np.float32)  # (out, in)

    @property
    def streamed(self) -> np.ndarray:
        return self.weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.weight[ids]

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        if norm is not None:
            x = rms_norm(x, norm, eps)
        with _blas.limit(limits=kernels.get_threads(), user_api="blas"):
            return x @ self.weight.T


def _store(w32: np.ndarray, precision: str) -> np.ndarray:
    """float32 values in the storage dtype of `precision` (bfloat16 as uint16 bits)."""
    if precision == "f16":
        return w32.astype(np.float16)
    if precision == "bf16":
        return ternary.f32_to_bf16(w32)
    return w32


def _matrix(weight: np.ndarray, precision: str) -> FloatMatrix | BlasLinear:
    if precision == "f32":
        return BlasLinear(weight)
    return FloatMatrix(weight, "F16" if precision == "f16" else "BF16")


def dequantize_rows(lin: TernaryLinear, r0: int, r1: int, precision: str = "f16") -> np.ndarray:
    """Rows [r0, r1) of the ternary layer's exact values w * scale, stored in `precision`."""
    n = lin.out_features
    r1 = min(r1, n)
    dtype = np.uint16 if precision == "bf16" else np.float16 if precision == "f16" else np.float32
    out = np.empty((r1 - r0, lin.in_features), dtype)
    scale = np.broadcast_to(np.asarray(lin.scale, np.float32), (n,))[r0:r1]
    one_scale = bool(np.all(scale == scale[0]))
    # code - 1 is the ternary weight: a lookup table turns codes into stored values in one pass
    table = _store(np.array([-1, 0, 1], np.float32) * scale[0], precision)
    for r in range(r0, r1, CHUNK_ROWS):
        codes = lin.codes(r, min(r + CHUNK_ROWS, r1))
        part = out[r - r0:r - r0 + len(codes)]
        if one_scale:
            np.take(table, codes, out=part)
        else:
            part[...] = _store(np.take(np.array([-1, 0, 1], np.float32), codes)
                               * scale[r - r0:r - r0 + len(codes), None], precision)
    return out


def dequantize(lin: TernaryLinear, precision: str = "f16") -> FloatMatrix | BlasLinear:
    """The ternary layer as a float layer of `precision` with the same values."""
    return _matrix(dequantize_rows(lin, 0, lin.out_features, precision), precision)


def float_head(m: FloatMatrix | Q8Matrix | Q4Matrix | BlasLinear, precision: str) -> FloatMatrix | BlasLinear:
    """The embedding/head in `precision` (a quantized head is dequantized first)."""
    if isinstance(m, FloatMatrix) and m.dtype == {"f16": "F16", "bf16": "BF16", "f32": "F32"}[precision]:
        return m if precision != "f32" else BlasLinear(m.weight)
    rows, cols = m.shape
    dtype = np.uint16 if precision == "bf16" else np.float16 if precision == "f16" else np.float32
    out = np.empty((rows, cols), dtype)
    for r in range(0, rows, 4 * CHUNK_ROWS):
        out[r:r + 4 * CHUNK_ROWS] = _store(m.rows(np.arange(r, min(r + 4 * CHUNK_ROWS, rows))), precision)
    return _matrix(out, precision)


def build_baseline(config: ModelConfig, weights: ModelWeights, precision: str = "f16") -> Transformer:
    """A Transformer computing the same model as `weights` with every linear layer and the head in
    `precision` ("f16", "bf16" or "f32"); the ternary weights are left as they are."""
    if precision not in PRECISIONS:
        raise ParamError(f"baseline precision must be one of {PRECISIONS}, got {precision!r}")
    layers = [LayerWeights(attn_norm=lw.attn_norm, ffn_norm=lw.ffn_norm, attn_sub_norm=lw.attn_sub_norm,
                           ffn_sub_norm=lw.ffn_sub_norm, qkv=dequantize(lw.qkv, precision),
                           o=dequantize(lw.o, precision), gate_up=dequantize(lw.gate_up, precision),
                           down=dequantize(lw.down, precision))
              for lw in weights.layers]
    head = float_head(weights.head, precision)
    embed = head if weights.embed is weights.head else float_head(weights.embed, precision)
    return Transformer(config, ModelWeights(embed=embed, norm=weights.norm, head=head, layers=layers))


def weight_bytes_per_token(weights: ModelWeights) -> int:
    """Bytes of weights one decode step reads: every linear layer, the head, and the norms."""
    total = weights.head.nbytes + weights.norm.nbytes
    for lw in weights.layers:
        total += sum(lin.nbytes for lin in lw.linears())
        total += sum(v.nbytes for v in (lw.attn_norm, lw.ffn_norm, lw.attn_sub_norm, lw.ffn_sub_norm) if v is not None)
    return total
