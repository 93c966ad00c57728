"""Numpy codecs of ggml's tensor types: the byte size of each, and decoders into the forms ternlm keeps.

The ternary types become codes ``w + 1`` in {0, 1, 2} plus their scales (I2_S: one float32 per tensor;
TQ1_0 / TQ2_0: one float16 per 256-column block); Q8_0 and Q4_0 become ternlm's Q8/Q4 matrices as they
are (same blocks, same nibble order). Every other type is dequantized to float32 by gguf-py, imported
only then: the types BitNet files use need nothing but numpy. Decoders take the tensor's raw bytes (a
uint8 view of the file) and raise ValueError on bad content; the GGUF reader turns that into a
FormatError naming the file and the tensor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ternlm import ternary

F32, F16, Q4_0, Q8_0, BF16, TQ1_0, TQ2_0, I2_S = 0, 1, 2, 8, 30, 34, 35, 36
FLOAT_TYPES = {F32: "<f4", F16: "<f2", BF16: "<u2"}  # BF16 as its raw 16-bit words, as ternlm keeps it
# bitnet.cpp's fork of ggml numbers its own types after TQ2_0; upstream ggml later reused 39 for MXFP4.
BITNET_CPP_TYPES = {36: "I2_S", 37: "I8_S", 38: "TL1", 39: "TL2"}
QK_K = 256  # elements per TQ1_0 / TQ2_0 block
I2S_TAIL = 32  # bytes after an I2_S tensor's packed codes: its float32 scale, then padding
I2S_BLOCKS = (128, 64)  # elements per I2_S block: x86 builds (and every file before 2025-11), ARM builds
DEQUANT_ROWS = 1024  # rows per gguf-py dequantize call: bounds the temporaries of big matrices
# type id -> (name, elements per block, bytes per block) of the types decoded here without gguf-py
_OWN = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_0: ("Q4_0", 32, 18), Q8_0: ("Q8_0", 32, 34),
        BF16: ("BF16", 1, 2), TQ1_0: ("TQ1_0", 256, 54), TQ2_0: ("TQ2_0", 256, 66)}


def _gguf_type(type_id: int) -> Any:
    """gguf-py's enum member for `type_id`; ValueError when unknown or when gguf-py is not installed."""
    try:
        from gguf import GGMLQuantizationType
    except ImportError:
        raise ValueError(f"ggml type {type_id} needs the gguf package (pip install gguf)") from None
    try:
        return GGMLQuantizationType(type_id)
    except ValueError:
        known = f" (bitnet.cpp's {BITNET_CPP_TYPES[type_id]}, which ternlm does not read: use I2_S, TQ1_0 or " \
                "TQ2_0)" if type_id in BITNET_CPP_TYPES else ""
        raise ValueError(f"unknown ggml type id {type_id}{known}") from None


def type_name(type_id: int) -> str:
    if type_id == I2_S:
        return "I2_S"
    if type_id in _OWN:
        return _OWN[type_id][0]
    try:
        return _gguf_type(type_id).name
    except ValueError:
        return f"type {type_id}"


def _block(type_id: int) -> tuple[int, int]:
    if type_id in _OWN:
        return _OWN[type_id][1:]
    qtype = _gguf_type(type_id)
    from gguf import GGML_QUANT_SIZES

    if qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"unknown size of ggml type {qtype.name}")
    return GGML_QUANT_SIZES[qtype]


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (numpy order: the last axis is contiguous) stored as ggml `type_id`.

    I2_S is n/4 bytes of codes plus a 32-byte tail holding the scale. Raises ValueError for a type whose
    size is unknown or a row that is not a whole number of blocks.
    """
    n = math.prod(shape)
    if type_id == I2_S:
        if n % 4:
            raise ValueError(f"I2_S needs a multiple of 4 elements, got {n}")
        return n // 4 + I2S_TAIL
    block, size = _block(type_id)
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"{type_name(type_id)} stores rows in blocks of {block}, but a row has {row} elements")
    return n // block * size


# ---- ternary types -----------------------------------------------------------------------------------


def decode_i2_s(raw: np.ndarray, rows: int, cols: int, block: int = 128) -> tuple[np.ndarray, float]:
    """Codes uint8 (rows, cols) and the per-tensor scale of bitnet.cpp's I2_S.

    The tensor is read as one flat run of elements (row-major) cut into `block`-element blocks of
    block/4 bytes; byte j of a block holds elements j, g+j, 2g+j, 3g+j (g = block/4) in bits 7-6, 5-4,
    3-2, 1-0. Code c means weight (c - 1) * scale; the float32 scale sits right after the codes.
    """
    if block not in I2S_BLOCKS:
        raise ValueError(f"I2_S block size must be one of {I2S_BLOCKS}, got {block}")
    n = rows * cols
    if n % block:
        raise ValueError(f"{n} elements are not whole {block}-element I2_S blocks")
    packed = raw[:n // 4].reshape(-1, 1, block // 4)  # (blocks, 1, block/4)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    codes = ((packed >> shifts) & 3).reshape(rows, cols)
    if (codes == 3).any():
        raise ValueError("I2_S code 3 is not a ternary value")
    scale = float(raw[n // 4:n // 4 + 4].view("<f4")[0])
    return codes, scale


def decode_tq2_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes uint8 (rows, cols) and block scales float32 (rows, cols // 256) of llama.cpp's TQ2_0.

    A 66-byte block is 64 bytes of 2-bit codes then a float16 scale d: byte 32h + j holds elements
    128h + j, +32, +64, +96 in bits 1-0, 3-2, 5-4, 7-6. Weight = (c - 1) * d.
    """
    blocks = raw.reshape(-1, 66)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = ((qs >> shifts) & 3).reshape(rows, cols)
    if (codes == 3).any():
        raise ValueError("TQ2_0 code 3 is not a ternary value")
    return codes, _block_scales(blocks[:, 64:66], rows)


def decode_tq1_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes uint8 (rows, cols) and block scales float32 (rows, cols // 256) of llama.cpp's TQ1_0.

    A 54-byte block is 48 bytes of five trits each, 4 bytes of four trits each, then a float16 scale.
    Trit i of byte b is ``(3 * (b * 3^i mod 256)) >> 8``. Elements run: trit i of byte j of the first
    32 bytes is element 32i + j, of the next 16 bytes 160 + 16i + j, of the last 4 bytes 240 + 4i + j.
    """
    blocks = raw.reshape(-1, 54)
    codes = np.concatenate([_trits(blocks[:, :32], 5), _trits(blocks[:, 32:48], 5), _trits(blocks[:, 48:52], 4)],
                           axis=1)
    return codes.reshape(rows, cols), _block_scales(blocks[:, 52:54], rows)


def _trits(b: np.ndarray, count: int) -> np.ndarray:
    # b (blocks, k) uint8 -> (blocks, count * k): trit i of every byte, then trit i + 1, ...
    powers = (3 ** np.arange(count, dtype=np.uint16)).astype(np.uint8).reshape(1, count, 1)
    t = b[:, None, :] * powers  # uint8 arithmetic wraps: b * 3^i mod 256
    return ((t.astype(np.uint16) * 3) >> 8).astype(np.uint8).reshape(len(b), -1)


def _block_scales(d_bytes: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(d_bytes).view("<f2").astype(np.float32).reshape(rows, -1)


# ---- Q8_0 / Q4_0 as ternlm keeps them ------------------------------------------------------------------


def decode_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """q int8 (rows, cols) and d float16 (rows, cols // 32): a 34-byte block is d then 32 int8 values."""
    blocks = raw.reshape(-1, 34)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").reshape(rows, cols // 32)
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(rows, cols)
    return q, d.astype(np.float16)


def decode_q4_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """q4 uint8 (rows, cols // 2) and d float16 (rows, cols // 32) of Q4_0.

    An 18-byte block is d then 16 bytes whose low nibbles hold elements 0..15 and high nibbles 16..31,
    value (nibble - 8) * d: exactly ternlm's Q4 layout (ternary.quantize_q4_0), so the bytes carry over.
    """
    blocks = raw.reshape(-1, 18)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").reshape(rows, cols // 32)
    q4 = np.ascontiguousarray(blocks[:, 2:]).reshape(rows, cols // 2)
    return q4, d.astype(np.float16)


# ---- everything to float32 ---------------------------------------------------------------------------


def dequantize(raw: np.ndarray, type_id: int, rows: int, cols: int) -> np.ndarray:
    """float32 (rows, cols) of a tensor of any type gguf-py can dequantize (and the float types)."""
    if type_id in (F32, F16):
        return raw.view(FLOAT_TYPES[type_id]).astype(np.float32).reshape(rows, cols)
    if type_id == BF16:
        return ternary.bf16_to_f32(raw.view("<u2").reshape(rows, cols))
    if type_id == I2_S:
        codes, scale = decode_i2_s(raw, rows, cols)
        return (codes.astype(np.float32) - 1) * np.float32(scale)
    if type_id == Q8_0:
        return ternary.dequantize_q8_0(*decode_q8_0(raw, rows, cols))
    if type_id == Q4_0:
        return ternary.dequantize_q4_0(*decode_q4_0(raw, rows, cols))
    if type_id in (TQ1_0, TQ2_0):
        codes, d = (decode_tq1_0 if type_id == TQ1_0 else decode_tq2_0)(raw, rows, cols)
        return ((codes.astype(np.float32) - 1).reshape(rows, -1, QK_K) * d[:, :, None]).reshape(rows, cols)
    qtype = _gguf_type(type_id)
    from gguf import quants

    data = raw.reshape(rows, tensor_nbytes(type_id, (cols,)))
    out = np.empty((rows, cols), np.float32)
    try:
        for r in range(0, rows, DEQUANT_ROWS):
            out[r:r + DEQUANT_ROWS] = quants.dequantize(data[r:r + DEQUANT_ROWS], qtype)
    except NotImplementedError:
        raise ValueError(f"gguf-py cannot dequantize {qtype.name}") from None
    except Exception as e:  # gguf-py does not promise which errors odd bytes raise
        raise ValueError(f"{qtype.name} data cannot be dequantized ({e})") from e
    return out
