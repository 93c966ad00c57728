"""The building blocks of the forward pass: ternary and float linear layers, RMSNorm, RoPE."""

from __future__ import annotations

import numpy as np

from ternlm import kernels, ternary
from ternlm.errors import ShapeError

LAYOUTS = ("i2", "tq1")  # packed weight layouts: 2 bits per weight, or 5 trits per byte (1.6 bits)


class TernaryLinear:
    """A linear layer with weights in {-1, 0, +1}, times one per-tensor scale.

    layout "i2": packed 2 bits each, (out, k_pad // 4) with k_pad a multiple of 256 (``ternary.pack``);
    "tq1": 5 per byte, (out, k_pad // 5) with k_pad a multiple of 320 (``ternary.pack_tq1``), 20 % fewer
    bytes. Calling it quantizes its float input per token to int8 (zero-padded to this layout's k_pad)
    and runs the integer kernel.
    """

    read_next: np.ndarray | None = None  # the weights run after this layer's (set by Transformer; see kernels)

    def __init__(self, packed: np.ndarray, in_features: int, scale: float | np.ndarray, layout: str = "i2") -> None:
        if layout not in LAYOUTS:
            raise ShapeError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        k_pad = ternary.padded_k(in_features) if layout == "i2" else ternary.padded_k_tq1(in_features)
        per_byte = 4 if layout == "i2" else 5
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != k_pad // per_byte:
            raise ShapeError(f"packed weight of shape {packed.shape} {packed.dtype} does not hold "
                             f"{in_features} input features in layout {layout}")
        self.packed = np.ascontiguousarray(packed)  # (out_features, k_pad // 4 or // 5) uint8
        self.layout = layout
        self.k_pad = k_pad
        self.in_features = in_features
        self.out_features = packed.shape[0]
        # One float for the whole matrix, or (out_features,) float32 when layers were concatenated.
        self.scale = np.ascontiguousarray(scale, np.float32) if isinstance(scale, np.ndarray) else float(scale)

    @classmethod
    def concat(cls, parts: list[TernaryLinear]) -> TernaryLinear:
        """Stack layers that read the same input (q|k|v, gate|up) into one matrix: one kernel call,
        each part keeping its own scale."""
        if len({p.layout for p in parts}) != 1:
            raise ShapeError("concat: parts have different layouts")
        scale = np.concatenate([np.broadcast_to(np.float32(p.scale), (p.out_features,)) for p in parts])
        return cls(np.concatenate([p.packed for p in parts]), parts[0].in_features, scale, parts[0].layout)

    @classmethod
    def from_codes(cls, codes: np.ndarray, scale: float) -> TernaryLinear:
        """Build from codes w+1 in {0, 1, 2}, shape (out, in): the form Hugging Face packs store."""
        return cls(ternary.pack_codes(codes), codes.shape[1], scale)

    @classmethod
    def from_float(cls, weight: np.ndarray) -> TernaryLinear:
        """Ternarize latent float weights (out, in) with the per-tensor absmean rule used in training."""
        w, scale = ternary.ternarize(weight)
        return cls(ternary.pack(w), weight.shape[1], scale)

    def codes(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """The codes w+1 of output rows [r0, r1), uint8 (rows, in_features)."""
        part = self.packed[r0:r1]
        if self.layout == "tq1":
            return ternary.unpack_codes_tq1(part, self.in_features)
        return ternary.unpack_codes(part, self.in_features)

    def to_layout(self, layout: str) -> TernaryLinear:
        """The same weights and scale in another packed layout (self when it already is)."""
        if layout == self.layout:
            return self
        if layout not in LAYOUTS:
            raise ShapeError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        pack = ternary.pack_codes_tq1 if layout == "tq1" else ternary.pack_codes
        # in chunks of rows: bounded temporaries for big matrices
        packed = np.concatenate([pack(np.ascontiguousarray(self.codes(r, r + 2048)))
                                 for r in range(0, self.out_features, 2048)])
        return TernaryLinear(packed, self.in_features, self.scale, layout)

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        """x (m, in_features) float32 -> (m, out_features) float32; with norm, of rms_norm(x, norm, eps)
        (normalized while quantized: one call)."""
        xq, a_scale, sums = kernels.quantize_activations(x, k_pad=self.k_pad, norm=norm, eps=eps)
        matmul = kernels.ternary_matmul_tq1 if self.layout == "tq1" else kernels.ternary_matmul
        return matmul(self.packed, xq, a_scale, sums, self.scale, next=self.read_next)

    @property
    def streamed(self) -> np.ndarray:
        """The array a call streams from memory: what the layer before it names as its read_next."""
        return self.packed

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


class FloatMatrix:
    """A float matrix (rows, cols) kept in its stored precision: the embedding table and the LM head."""

    read_next: np.ndarray | None = None  # as for TernaryLinear

    def __init__(self, weight: np.ndarray, dtype: str) -> None:
        if dtype not in ("F32", "F16", "BF16") or weight.ndim != 2:
            raise ShapeError(f"float matrix must be 2-D F32/F16/BF16, got {dtype} {weight.shape}")
        self.weight = weight  # (rows, cols): float32, float16, or bfloat16 bits as uint16
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Gather rows as float32: the embedding lookup."""
        picked = self.weight[ids]
        if self.dtype == "BF16":
            return ternary.bf16_to_f32(picked)
        return picked.astype(np.float32)

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        """x (m, cols) float32 -> (m, rows) float32; with norm, of rms_norm(x, norm, eps)."""
        if norm is not None:
            x = rms_norm(x, norm, eps)
        return kernels.float_matmul(self.weight, x, next=self.read_next)

    @property
    def streamed(self) -> np.ndarray:
        return self.weight

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Q8Matrix:
    """A float matrix stored as Q8_0 (int8 values, one float16 scale per 32 columns): the quantized head.

    Activations are quantized per 32-column block too, so outlier dimensions of the hidden state do not
    cost the other dimensions their precision.
    """

    dtype = "Q8_0"
    CHUNK_ROWS = 2048  # quantize this many rows at a time, bounding the float32 temporaries
    read_next: np.ndarray | None = None  # as for TernaryLinear

    def __init__(self, q: np.ndarray, d: np.ndarray) -> None:
        if q.dtype != np.int8 or d.dtype != np.float16 or q.ndim != 2 or d.shape != (q.shape[0], q.shape[1] // 32):
            raise ShapeError(f"Q8_0 matrix needs int8 (n, k) and float16 (n, k/32), got {q.shape} {q.dtype} "
                             f"and {d.shape} {d.dtype}")
        self.q = q  # (rows, cols) int8
        self.d = d  # (rows, cols // 32) float16

    @classmethod
    def from_float(cls, m: FloatMatrix) -> Q8Matrix:
        rows, cols = m.shape
        q = np.empty((rows, cols), np.int8)
        d = np.empty((rows, cols // 32), np.float16)
        for r in range(0, rows, cls.CHUNK_ROWS):
            q[r:r + cls.CHUNK_ROWS], d[r:r + cls.CHUNK_ROWS] = ternary.quantize_q8_0(
                m.rows(np.arange(r, min(r + cls.CHUNK_ROWS, rows))))
        return cls(q, d)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return ternary.dequantize_q8_0(self.q[ids], self.d[ids])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return kernels.q8_matmul(self.q, self.d, *kernels.quantize_act_q8_0(x), next=self.read_next)

    @property
    def streamed(self) -> np.ndarray:
        return self.q


class Q4Matrix:
    """A float matrix stored as Q4_0 (4-bit values in [-7, 7], one float16 scale per 32 columns): a head
    of about 0.56 bytes per weight, with Q8_0 activations as for Q8Matrix."""

    dtype = "Q4_0"
    CHUNK_ROWS = Q8Matrix.CHUNK_ROWS
    read_next: np.ndarray | None = None  # as for TernaryLinear

    def __init__(self, q4: np.ndarray, d: np.ndarray) -> None:
        if (q4.dtype != np.uint8 or d.dtype != np.float16 or q4.ndim != 2
                or d.shape != (q4.shape[0], q4.shape[1] // 16) or q4.shape[1] % 16):
            raise ShapeError(f"Q4_0 matrix needs uint8 (n, k/2) and float16 (n, k/32), got {q4.shape} {q4.dtype} "
                             f"and {d.shape} {d.dtype}")
        self.q4 = q4  # (rows, cols // 2) uint8: two 4-bit values per byte (layout in ternary.py)
        self.d = d  # (rows, cols // 32) float16

    @classmethod
    def from_float(cls, m: FloatMatrix) -> Q4Matrix:
        rows, cols = m.shape
        q4 = np.empty((rows, cols // 2), np.uint8)
        d = np.empty((rows, cols // 32), np.float16)
        for r in range(0, rows, cls.CHUNK_ROWS):
            q4[r:r + cls.CHUNK_ROWS], d[r:r + cls.CHUNK_ROWS] = ternary.quantize_q4_0(
                m.rows(np.arange(r, min(r + cls.CHUNK_ROWS, rows))))
        return cls(q4, d)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q4.shape[0], 2 * self.q4.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q4.nbytes + self.d.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return ternary.dequantize_q4_0(self.q4[ids], self.d[ids])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return kernels.q4_matmul(self.q4, self.d, *kernels.quantize_act_q8_0(x), next=self.read_next)

    @property
    def streamed(self) -> np.ndarray:
        return self.q4


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of x (t, dim) float32 over its last axis."""
    return kernels.rmsnorm(x, weight, eps)


class Rope:
    """Rotary position embedding in the rotate-half layout, with cos/sin tables for every position."""

    def __init__(self, head_dim: int, theta: float, max_seq_len: int) -> None:
        # float32 throughout, as in training: at position 4000 a float32 angle is off by ~1e-4 rad,
        # and the model learned with exactly those angles.
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
        angles = np.outer(np.arange(max_seq_len, dtype=np.float32), inv_freq)  # (max_seq_len, head_dim/2)
        self.cos = np.cos(angles)
        self.sin = np.sin(angles)

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        # x (n_heads, t, head_dim) at positions start..start+t-1
        t = x.shape[1]
        return ternary.rope(x, self.cos[start:start + t], self.sin[start:start + t])
