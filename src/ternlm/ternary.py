"""Ternary math in plain numpy: packing, per-token int8 activations, and the reference matmuls.

This is the specification the C kernels (ternlm.kernels) are tested against, and their fallback.

Packed weight layout (ternlm's own, shaped for AVX-512 VNNI): codes ``c = w + 1`` in {0, 1, 2},
2 bits each; K is padded to a multiple of 256 with code 1 (weight 0); the packed array is uint8
``(n, k_pad // 4)``. Byte ``j`` (0..63) of the 64-byte block ``b`` of a row holds columns
``256b + j`` (bits 0-1), ``256b + 64 + j`` (bits 2-3), ``256b + 128 + j`` (bits 4-5) and
``256b + 192 + j`` (bits 6-7), so one 64-byte load unpacks into four 64-column code vectors.

TQ1 layout (optional, 1.6 bits/weight, five trits per byte as in llama.cpp's TQ1_0): K is padded to a
multiple of 320 with code 1; the packed array is uint8 ``(n, k_pad // 5)``. Byte ``j`` (0..63) of the
64-byte block ``b`` of a row holds columns ``320b + 64i + j`` (i = 0..4) as ``v = sum_i c_i 3^(4-i)``,
stored as ``q = ceil(256 v / 243)``; then with ``t_0 = q``, ``t_{i+1} = 3 t_i mod 256`` the code of
column ``320b + 64i + j`` is ``floor(3 t_i / 256)``. Activations for it are padded to the TQ1 k_pad
(``quantize_activations(x, k_pad=padded_k_tq1(k))``).
"""

from __future__ import annotations

import numpy as np

from ternlm.errors import ShapeError

BLOCK = 256
TQ1_BLOCK = 320  # columns per 64-byte block of the TQ1 layout
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 256-column blocks."""
    if k <= 0:
        raise ShapeError(f"k must be positive, got {k}")
    return -(-k // BLOCK) * BLOCK


def padded_k_tq1(k: int) -> int:
    """K rounded up to a whole number of 320-column TQ1 blocks."""
    if k <= 0:
        raise ShapeError(f"k must be positive, got {k}")
    return -(-k // TQ1_BLOCK) * TQ1_BLOCK


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


def pack_codes_tq1(codes: np.ndarray) -> np.ndarray:
    """Pack codes ``w + 1`` in {0, 1, 2}, uint8 (n, k), into the TQ1 layout: uint8 (n, k_pad // 5)."""
    _check_2d(codes, "codes", np.uint8)
    if codes.max() > 2:
        raise ShapeError("codes: values must be 0, 1 or 2 (ternary weight + 1)")
    n, k = codes.shape
    kp = padded_k_tq1(k)
    full = np.ones((n, kp), dtype=np.uint8)
    full[:, :k] = codes
    c = full.reshape(n, kp // TQ1_BLOCK, 5, 64).astype(np.int32)  # column 320b + 64i + j
    v = c[:, :, 0] * 81 + c[:, :, 1] * 27 + c[:, :, 2] * 9 + c[:, :, 3] * 3 + c[:, :, 4]
    return ((v * 256 + 242) // 243).astype(np.uint8).reshape(n, kp // 5)


def pack_tq1(w: np.ndarray) -> np.ndarray:
    """Pack a ternary int8 (n, k) matrix into the TQ1 layout: uint8 (n, padded_k_tq1(k) // 5)."""
    _check_2d(w, "w", np.int8)
    if w.min() < -1 or w.max() > 1:
        raise ShapeError("w: values must be -1, 0 or 1")
    return pack_codes_tq1((w + 1).astype(np.uint8))


def unpack_codes_tq1(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_codes_tq1: uint8 (n, k_pad // 5) -> codes uint8 (n, k)."""
    _check_2d(packed, "packed", np.uint8)
    n, kq = packed.shape
    if kq % 64 != 0:
        raise ShapeError(f"packed: {kq} bytes per row is not a multiple of 64 (320 columns)")
    if not 0 < k <= 5 * kq:
        raise ShapeError(f"k = {k} does not fit in {kq} TQ1 bytes per row (k_pad = {5 * kq})")
    t = packed.reshape(n, kq // 64, 1, 64).astype(np.uint16)
    out = np.empty((n, kq // 64, 5, 64), np.uint8)
    for i in range(5):
        t3 = t * 3
        out[:, :, i : i + 1] = t3 >> 8
        t = t3 & 255
    return out.reshape(n, 5 * kq)[:, :k]


def unpack_tq1(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_tq1: uint8 (n, k_pad // 5) -> ternary int8 (n, k)."""
    codes = unpack_codes_tq1(packed, k)
    if codes.max() > 2:
        raise ShapeError("packed: contains a byte that is not a TQ1 ternary code")
    return codes.astype(np.int8) - 1


# ---- activations ---------------------------------------------------------------------------------


def quantize_activations(x: np.ndarray, k_pad: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization of x float32 (m, k).

    Returns ``xq`` int8 (m, k_pad) zero-padded (k_pad: ``padded_k(k)`` by default; ``padded_k_tq1(k)``
    for the TQ1 layout; any multiple of 64 >= k is accepted), ``a_scale`` float32 (m,) = 127 / max(max|x|, 1e-5),
    and ``sums`` int32 (m,) = the row sums of xq. All float32, round half to even.
    """
    _check_2d(x, "x", np.float32)
    m, k = x.shape
    amax = np.max(np.abs(x), axis=1)
    a_scale = np.float32(127.0) / np.maximum(amax, np.float32(1e-5))
    q = np.clip(np.rint(x * a_scale[:, None]), -128, 127).astype(np.int8)
    if k_pad is None:
        k_pad = padded_k(k)
    elif k_pad < k or k_pad % 64 != 0:
        raise ShapeError(f"k_pad = {k_pad} must be a multiple of 64 and at least k = {k}")
    xq = np.zeros((m, k_pad), dtype=np.int8)
    xq[:, :k] = q
    return xq, a_scale.astype(np.float32), xq.sum(axis=1, dtype=np.int32)


# ---- matmuls -------------------------------------------------------------------------------------


def _check_matmul(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray, per_byte: int, block: int) -> None:
    _check_2d(packed, "packed", np.uint8)
    _check_2d(xq, "xq", np.int8)
    if packed.shape[1] * per_byte != xq.shape[1] or xq.shape[1] % block != 0:
        raise ShapeError(f"k_pad mismatch: packed {packed.shape} holds k_pad = {packed.shape[1] * per_byte}, "
                         f"xq has {xq.shape[1]}")
    if sums.shape != (xq.shape[0],):
        raise ShapeError(f"sums: expected shape ({xq.shape[0]},), got {sums.shape}")


def _accumulate(codes: np.ndarray, xq: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Exact int32 ``sum_j c[r, j] * xq[i, j] - sums[i]`` from codes (n, k_pad) in {0, 1, 2}."""
    # Float BLAS on integer values is exact while every partial sum stays below 2^24 (float32) or
    # 2^53 (float64): |sum c * xq| <= 2 * 128 * k_pad. Much faster than numpy's integer matmul.
    ftype = np.float32 if codes.shape[1] <= 1 << 16 else np.float64
    acc = xq.astype(ftype) @ codes.T.astype(ftype)
    return acc.astype(np.int32) - sums.astype(np.int32)[:, None]


def ternary_matmul_i32(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Exact int32 accumulator (m, n): ``sum_j c[r, j] * xq[i, j] - sums[i]`` = ``sum_j w[r, j] * xq[i, j]``."""
    _check_matmul(packed, xq, sums, 4, BLOCK)
    return _accumulate(unpack_codes(packed, packed.shape[1] * 4), xq, sums)


def ternary_matmul(
    packed: np.ndarray, xq: np.ndarray, a_scale: np.ndarray, sums: np.ndarray, w_scale: float | np.ndarray
) -> np.ndarray:
    """y float32 (m, n) = float32(acc) * (w_scale / a_scale[i]), the ratio computed in float32.

    ``w_scale`` is one float for the whole matrix, or a float32 array (n,) of one scale per output row
    (fused q|k|v or gate|up: each sub-matrix keeps its own scale); then y[i, r] uses w_scale[r] / a_scale[i].
    """
    acc = ternary_matmul_i32(packed, xq, sums)
    if a_scale.shape != (xq.shape[0],):
        raise ShapeError(f"a_scale: expected shape ({xq.shape[0]},), got {a_scale.shape}")
    a = a_scale.astype(np.float32)
    if isinstance(w_scale, np.ndarray):
        if w_scale.shape != (packed.shape[0],) or w_scale.dtype != np.float32:
            raise ShapeError(f"w_scale: expected float32 ({packed.shape[0]},), got {w_scale.dtype} {w_scale.shape}")
        return acc.astype(np.float32) * (w_scale[None, :] / a[:, None])
    ratio = np.float32(w_scale) / a
    return acc.astype(np.float32) * ratio[:, None]


def ternary_matmul_tq1_i32(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """``ternary_matmul_i32`` for TQ1-packed weights (n, k_pad // 5) and xq (m, k_pad), k_pad % 320 == 0."""
    _check_matmul(packed, xq, sums, 5, TQ1_BLOCK)
    return _accumulate(unpack_codes_tq1(packed, packed.shape[1] * 5), xq, sums)


def ternary_matmul_tq1(
    packed: np.ndarray, xq: np.ndarray, a_scale: np.ndarray, sums: np.ndarray, w_scale: float | np.ndarray
) -> np.ndarray:
    """``ternary_matmul`` for TQ1-packed weights: the same output formula and scale rules."""
    return _scale(ternary_matmul_tq1_i32(packed, xq, sums), packed.shape[0], xq.shape[0], a_scale, w_scale)


def _scale(acc: np.ndarray, n: int, m: int, a_scale: np.ndarray, w_scale: float | np.ndarray) -> np.ndarray:
    if a_scale.shape != (m,):
        raise ShapeError(f"a_scale: expected shape ({m},), got {a_scale.shape}")
    a = a_scale.astype(np.float32)
    if isinstance(w_scale, np.ndarray):
        if w_scale.shape != (n,) or w_scale.dtype != np.float32:
            raise ShapeError(f"w_scale: expected float32 ({n},), got {w_scale.dtype} {w_scale.shape}")
        return acc.astype(np.float32) * (w_scale[None, :] / a[:, None])
    ratio = np.float32(w_scale) / a
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


# ---- Q8_0 (the quantized LM head) ----------------------------------------------------------------
# Weights: int8 q (n, k) with one float16 scale per 32-column block, d (n, k // 32), w ≈ q * d.
# Activations: the same blocks with float32 scales (hidden states have outlier dimensions, so one
# scale per token would crush the other 31 values of a block's neighbours).

QBLOCK = 32


def _check_qblock(a: np.ndarray, name: str, dtype: np.dtype | type) -> tuple[int, int]:
    _check_2d(a, name, dtype)
    if a.shape[1] % QBLOCK != 0:
        raise ShapeError(f"{name}: k = {a.shape[1]} is not a multiple of {QBLOCK}")
    return a.shape


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 weights: w float32 (n, k) -> (q int8 (n, k), d float16 (n, k // 32)).

    ``d = float16(max|w_block| / 127)``; q = clamp(rint(w / d), -127, 127) with the stored (rounded) d,
    so q * d is the closest the format can get; a block whose d rounds to 0 gets q = 0.
    """
    n, k = _check_qblock(np.asarray(w, dtype=np.float32), "w", np.float32)
    blocks = np.asarray(w, dtype=np.float32).reshape(n, k // QBLOCK, QBLOCK)
    d = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float16)
    d32 = d.astype(np.float32)[:, :, None]
    q = np.divide(blocks, d32, out=np.zeros_like(blocks), where=d32 > 0)
    return np.clip(np.rint(q), -127, 127).astype(np.int8).reshape(n, k), d


def dequantize_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """float32 (n, k) = q * d, each scale applied to its 32-column block."""
    n, k = _check_qblock(q, "q", np.int8)
    if d.shape != (n, k // QBLOCK):
        raise ShapeError(f"d: expected shape ({n}, {k // QBLOCK}), got {d.shape}")
    return (q.reshape(n, -1, QBLOCK).astype(np.float32) * d.astype(np.float32)[:, :, None]).reshape(n, k)


def quantize_act_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 activations: x float32 (m, k) -> (xq int8 (m, k), xd float32 (m, k // 32)).

    Per block, float32: ``amax = max|x|``; ``d = amax / 127``, ``xq = clamp(rint(x * (127 / amax)), -127, 127)``
    (round half to even); a block with amax < 1e-30 gets d = 0, xq = 0.
    """
    m, k = _check_qblock(x, "x", np.float32)
    blocks = x.reshape(m, k // QBLOCK, QBLOCK)
    amax = np.abs(blocks).max(axis=2)
    ok = amax >= np.float32(1e-30)
    safe = np.where(ok, amax, np.float32(1))
    d = np.where(ok, safe / np.float32(127), np.float32(0)).astype(np.float32)
    inv = np.where(ok, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(blocks * inv[:, :, None]), -127, 127).astype(np.int8)
    return xq.reshape(m, k), d


def q8_block_dots(q: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Exact int32 (m, n, k // 32): ``isum[i, r, b] = sum_{j in block b} q[r, j] * xq[i, j]``."""
    n, k = _check_qblock(q, "q", np.int8)
    m, kx = _check_qblock(xq, "xq", np.int8)
    if kx != k:
        raise ShapeError(f"q {q.shape} and xq {xq.shape} disagree on k")
    qb = q.reshape(n, k // QBLOCK, QBLOCK).astype(np.float32)
    xb = xq.reshape(m, k // QBLOCK, QBLOCK).astype(np.float32)
    # |block dot| <= 32 * 127 * 127 < 2^24: float32 BLAS is exact here
    return np.einsum("mbj,nbj->mnb", xb, qb, optimize=True).astype(np.int32)


def q8_matmul(q: np.ndarray, d: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """y float32 (m, n) = sum_b float(isum[i, r, b]) * (float(d[r, b]) * xd[i, b]), in a fixed order.

    The order every C kernel reproduces bit for bit: 16 lane sums, lane l += p_b for b = l, l + 16, ...
    (starting from +0), then lanes l + 8 -> l, l + 4 -> l, l + 2 -> l, and lane 0 + lane 1.
    """
    n, k = _check_qblock(q, "q", np.int8)
    m = xq.shape[0]
    nb = k // QBLOCK
    if d.shape != (n, nb) or d.dtype != np.float16:
        raise ShapeError(f"d: expected float16 ({n}, {nb}), got {d.dtype} {d.shape}")
    if xd.shape != (m, nb) or xd.dtype != np.float32:
        raise ShapeError(f"xd: expected float32 ({m}, {nb}), got {getattr(xd, 'dtype', '?')} {xd.shape}")
    isum = q8_block_dots(q, xq).astype(np.float32)
    p = isum * (d.astype(np.float32)[None, :, :] * xd[:, None, :])
    groups = -(-nb // 16)
    lanes = np.zeros((m, n, groups * 16), np.float32)
    lanes[:, :, :nb] = p
    lanes = lanes.reshape(m, n, groups, 16)
    acc = np.zeros((m, n, 16), np.float32)
    for g in range(groups):
        acc += lanes[:, :, g]
    half = 8
    while half >= 1:
        acc = acc[:, :, :half] + acc[:, :, half : 2 * half]
        half //= 2
    return acc[:, :, 0]


# ---- Q4_0 (the smaller quantized LM head) ---------------------------------------------------------
# Weights: symmetric 4-bit, per 32-column block q in [-7, 7] with a float16 scale d = f16(max|w| / 7),
# w ≈ q * d (no -8: the grid stays symmetric, like Q8_0's [-127, 127]). Stored as nibbles u = q + 8
# in [1, 15], q4 uint8 (n, k // 2): byte j (0..15) of block b holds column 32b + j in its low nibble
# and column 32b + 16 + j in its high nibble, so one 16-byte load unpacks (& 0xF, >> 4) to the two
# contiguous 16-column halves of the block. Activations are Q8_0; block dots are
# isum = sum u * xq - 8 * sum xq (exact), then the float order of q8_matmul.


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 weights: w float32 (n, k) -> (q4 uint8 (n, k // 2) packed nibbles, d float16 (n, k // 32)).

    ``d = float16(max|w_block| / 7)``; q = clamp(rint(w / d), -7, 7) with the stored d (a block whose d
    rounds to 0 gets q = 0), packed as q + 8 (see the layout note above).
    """
    n, k = _check_qblock(np.asarray(w, dtype=np.float32), "w", np.float32)
    blocks = np.asarray(w, dtype=np.float32).reshape(n, k // QBLOCK, QBLOCK)
    d = (np.abs(blocks).max(axis=2) / np.float32(7)).astype(np.float16)
    d32 = d.astype(np.float32)[:, :, None]
    q = np.divide(blocks, d32, out=np.zeros_like(blocks), where=d32 > 0)
    u = (np.clip(np.rint(q), -7, 7) + 8).astype(np.uint8)
    q4 = u[:, :, :16] | (u[:, :, 16:] << 4)
    return q4.reshape(n, k // 2), d


def unpack_q4_0(q4: np.ndarray) -> np.ndarray:
    """int8 (n, k) values in [-7, 7] (or -8 for a zero nibble) of packed q4 uint8 (n, k // 2)."""
    _check_2d(q4, "q4", np.uint8)
    n, half = q4.shape
    if half % (QBLOCK // 2) != 0:
        raise ShapeError(f"q4: {half} bytes per row is not a multiple of {QBLOCK // 2}")
    b = q4.reshape(n, -1, QBLOCK // 2)
    u = np.concatenate([b & 0xF, b >> 4], axis=2)
    return (u.astype(np.int8) - 8).reshape(n, 2 * half)


def dequantize_q4_0(q4: np.ndarray, d: np.ndarray) -> np.ndarray:
    """float32 (n, k) = q * d, each scale applied to its 32-column block."""
    q = unpack_q4_0(q4)
    n, k = q.shape
    if d.shape != (n, k // QBLOCK):
        raise ShapeError(f"d: expected shape ({n}, {k // QBLOCK}), got {d.shape}")
    return (q.reshape(n, -1, QBLOCK).astype(np.float32) * d.astype(np.float32)[:, :, None]).reshape(n, k)


def q4_matmul(q4: np.ndarray, d: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """y float32 (m, n) from Q4_0 weights and Q8_0 activations: q8_matmul of the unpacked values.

    Same fixed float order as ``q8_matmul`` (every C kernel reproduces it bit for bit).
    """
    _check_2d(q4, "q4", np.uint8)
    _check_2d(xq, "xq", np.int8)
    if 2 * q4.shape[1] != xq.shape[1]:
        raise ShapeError(f"q4 {q4.shape} and xq {xq.shape} disagree on k (q4 holds k / 2 bytes per row)")
    return q8_matmul(unpack_q4_0(q4), d, xq, xd)


# ---- float ops of a transformer block: the references of kernels/ops.c ---------------------------

ACTIVATIONS = {"relu2": 0, "silu": 1}


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis in float32: w * (x * (1 / sqrt(mean(x²) + eps)))."""
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return w * (x * (np.float32(1.0) / np.sqrt(var + np.float32(eps))))


def glu(gu: np.ndarray, act: str) -> np.ndarray:
    """Gated FFN activation: gu (m, 2f) = [gate | up] -> act(gate) * up (m, f); act is relu2 or silu."""
    gate, up = np.split(gu, 2, axis=-1)
    if act == "relu2":
        return np.square(np.maximum(gate, np.float32(0.0))) * up
    with np.errstate(over="ignore"):  # exp(-gate) may overflow to inf: silu is then -0, as it should be
        return gate / (np.float32(1.0) + np.exp(-gate)) * up


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x (..., t, hd) with cos, sin (t, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_softmax(x: np.ndarray, period: int, first: int, scale: float) -> np.ndarray:
    """Row r of x (rows, s) as softmax(scale * x) over its first first + r % period entries, 0 after them."""
    rows, s = x.shape
    visible = np.arange(s) < np.minimum(first + np.arange(rows) % period, s)[:, None]
    y = np.where(visible, x * np.float32(scale), -np.inf)
    y = np.exp(y - y.max(axis=-1, keepdims=True))
    return (y / y.sum(axis=-1, keepdims=True)).astype(np.float32)


def attention_decode(qkv: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int, cos: np.ndarray,
                     sin: np.ndarray, n_heads: int, scale: float) -> np.ndarray:
    """Attention of one token at `pos`: RoPE, cache write, then grouped-query softmax attention.

    qkv (n_heads*hd + 2*n_kv*hd,); caches (n_kv, max_len, hd), written at pos; cos, sin (hd/2,).
    Returns (n_heads*hd,).
    """
    n_kv, _, hd = k_cache.shape
    q, k, v = np.split(qkv, [n_heads * hd, (n_heads + n_kv) * hd])
    k_cache[:, pos] = rope(k.reshape(n_kv, hd), cos, sin)
    v_cache[:, pos] = v.reshape(n_kv, hd)
    q = rope(q.reshape(n_kv, n_heads // n_kv, hd), cos, sin)  # query heads grouped by their KV head
    scores = (q @ k_cache[:, :pos + 1].transpose(0, 2, 1)) * np.float32(scale)  # (n_kv, group, pos+1)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ v_cache[:, :pos + 1]).reshape(-1)
