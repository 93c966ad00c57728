"""Ternary math in plain numpy: packing, per-token int8 activations, and the reference matmuls.

This is the specification the C kernels (ternlm.kernels) are tested against, and their fallback.

Packed weight layout (ternlm's own, shaped for AVX-512 VNNI): codes ``c = w + 1`` in {0, 1, 2},
2 bits each; K is padded to a multiple of 256 with code 1 (weight 0); the packed array is uint8
``(n, k_pad // 4)``. Byte ``j`` (0..63) of the 64-byte block ``b`` of a row holds columns
``256b + j`` (bits 0-1), ``256b + 64 + j`` (bits 2-3), ``256b + 128 + j`` (bits 4-5) and
``256b + 192 + j`` (bits 6-7), so one 64-byte load unpacks into four 64-column code vectors.
"""

from __future__ import annotations

import numpy as np

from ternlm.errors import ShapeError

BLOCK = 256
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 256-column blocks."""
    if k <= 0:
        raise ShapeError(f"k must be positive, got {k}")
    return -(-k // BLOCK) * BLOCK


def _check_2d(a: np.ndarray, name: str, dtype: np.dtype | type | None = None) -> None:
    if not isinstance(a, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.ndim != 2:
        raise ShapeError(f"{name}: expected a 2-D array, got shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise ShapeError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ShapeError(f"{name}: empty array of shape {a.shape}")


# ---- weights -------------------------------------------------------------------------------------


def ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-tensor absmean ternarization, in torch's float32 order (BitNet's weight_quant).

    ``s = 1 / max(mean|W|, 1e-5)``, ``Wq = clamp(round(W * s), -1, 1)``, returned with the output
    multiplier ``w_scale = 1 / s`` (≈ mean|W|), so that ``W ≈ Wq * w_scale``.
    """
    _check_2d(w, "w")
    w32 = np.asarray(w, dtype=np.float32)
    # mean accumulated in float64 then rounded: the correctly rounded float32 mean.
    mean = np.float32(np.abs(w32).mean(dtype=np.float64))
    s = np.float32(1.0) / np.maximum(mean, np.float32(1e-5))
    wq = np.clip(np.rint(w32 * s), -1, 1).astype(np.int8)
    return wq, float(np.float32(1.0) / s)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Pack codes ``w + 1`` in {0, 1, 2}, uint8 (n, k), into the layout above: uint8 (n, k_pad // 4)."""
    _check_2d(codes, "codes", np.uint8)
    if codes.max() > 2:
        raise ShapeError("codes: values must be 0, 1 or 2 (ternary weight + 1)")
    n, k = codes.shape
    kp = padded_k(k)
    full = np.ones((n, kp), dtype=np.uint8)
    full[:, :k] = codes
    q = full.reshape(n, kp // BLOCK, 4, 64)  # [row, block, quarter, byte]: column 256b + 64q + j
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(n, kp // 4)


def pack(w: np.ndarray) -> np.ndarray:
    """Pack a ternary int8 (n, k) matrix with values in {-1, 0, 1}: uint8 (n, k_pad // 4)."""
    _check_2d(w, "w", np.int8)
    if w.min() < -1 or w.max() > 1:
        raise ShapeError("w: values must be -1, 0 or 1")
    return pack_codes((w + 1).astype(np.uint8))


def unpack_codes(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 (n, k_pad // 4) -> codes uint8 (n, k)."""
    _check_2d(packed, "packed", np.uint8)
    n, kq = packed.shape
    if kq % 64 != 0:
        raise ShapeError(f"packed: {kq} bytes per row is not a multiple of 64 (256 columns)")
    if not 0 < k <= 4 * kq:
        raise ShapeError(f"k = {k} does not fit in {kq} packed bytes per row (k_pad = {4 * kq})")
    q = (packed.reshape(n, kq // 64, 1, 64) >> _SHIFTS) & 3
    return q.reshape(n, 4 * kq)[:, :k]


def unpack(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack: uint8 (n, k_pad // 4) -> ternary int8 (n, k)."""
    codes = unpack_codes(packed, k)
    if codes.max() > 2:
        raise ShapeError("packed: contains code 3, which is not a ternary weight")
    return codes.astype(np.int8) - 1


# ---- activations ---------------------------------------------------------------------------------


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization of x float32 (m, k).

    Returns ``xq`` int8 (m, k_pad) zero-padded, ``a_scale`` float32 (m,) = 127 / max(max|x|, 1e-5),
    and ``sums`` int32 (m,) = the row sums of xq. All float32, round half to even.
    """
    _check_2d(x, "x", np.float32)
    m, k = x.shape
    amax = np.max(np.abs(x), axis=1)
    a_scale = np.float32(127.0) / np.maximum(amax, np.float32(1e-5))
    q = np.clip(np.rint(x * a_scale[:, None]), -128, 127).astype(np.int8)
    xq = np.zeros((m, padded_k(k)), dtype=np.int8)
    xq[:, :k] = q
    return xq, a_scale.astype(np.float32), xq.sum(axis=1, dtype=np.int32)


# ---- matmuls -------------------------------------------------------------------------------------


def _check_matmul(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray) -> None:
    _check_2d(packed, "packed", np.uint8)
    _check_2d(xq, "xq", np.int8)
    if packed.shape[1] * 4 != xq.shape[1] or xq.shape[1] % BLOCK != 0:
        raise ShapeError(
            f"k_pad mismatch: packed {packed.shape} holds k_pad = {packed.shape[1] * 4}, xq has {xq.shape[1]}"
        )
    if sums.shape != (xq.shape[0],):
        raise ShapeError(f"sums: expected shape ({xq.shape[0]},), got {sums.shape}")


def ternary_matmul_i32(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Exact int32 accumulator (m, n): ``sum_j c[r, j] * xq[i, j] - sums[i]`` = ``sum_j w[r, j] * xq[i, j]``."""
    _check_matmul(packed, xq, sums)
    codes = unpack_codes(packed, packed.shape[1] * 4)
    # Float BLAS on integer values is exact while every partial sum stays below 2^24 (float32) or
    # 2^53 (float64): |sum c * xq| <= 2 * 128 * k_pad. Much faster than numpy's integer matmul.
    ftype = np.float32 if packed.shape[1] * 4 <= 1 << 16 else np.float64
    acc = xq.astype(ftype) @ codes.T.astype(ftype)
    return acc.astype(np.int32) - sums.astype(np.int32)[:, None]


def ternary_matmul(
    packed: np.ndarray, xq: np.ndarray, a_scale: np.ndarray, sums: np.ndarray, w_scale: float
) -> np.ndarray:
    """y float32 (m, n) = float32(acc) * (w_scale / a_scale[i]), the ratio computed once per row in float32."""
    acc = ternary_matmul_i32(packed, xq, sums)
    if a_scale.shape != (xq.shape[0],):
        raise ShapeError(f"a_scale: expected shape ({xq.shape[0]},), got {a_scale.shape}")
    ratio = np.float32(w_scale) / a_scale.astype(np.float32)
    return acc.astype(np.float32) * ratio[:, None]


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bits stored as uint16 -> float32 (exact)."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as uint16, round to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return out


def float_matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y float32 (m, n) = x (m, k) @ w.T, w float32, float16, or bfloat16 bits as uint16 (n, k)."""
    _check_2d(w, "w")
    _check_2d(x, "x", np.float32)
    if w.shape[1] != x.shape[1]:
        raise ShapeError(f"w {w.shape} and x {x.shape} disagree on k")
    if w.dtype == np.uint16:
        w32 = bf16_to_f32(w)
    elif w.dtype in (np.float32, np.float16):
        w32 = w.astype(np.float32)
    else:
        raise ShapeError(f"w: expected float32, float16 or uint16 (bfloat16 bits), got {w.dtype}")
    return x @ w32.T
