"""Write a loaded model as a GGUF file that llama.cpp runs.

Ternary projections are written as TQ2_0 (2.06 bits/weight) or TQ1_0 (1.69 bits/weight): blocks of 256 weights,
each with one float16 scale; or as bitnet.cpp's I2_S (2 bits/weight, one float32 scale per tensor, so exact),
for bitnet.cpp only (see the architectures below). In TQ files every block of a row gets that row's scale, so
the ternary values are exact; the scale is rounded to float16. That rounding (up to 2^-11) alone moved the
shipped model's logits by 2.5 % of their spread (int8 activation roundings flip and add up), so when a tensor's
one scale is not a float16 number, a one-value F32 tensor `<name>.scale` holds the ratio of the scale to its
float16 rounding: llama.cpp (and ternlm's reader) multiply a projection's output by it, which gives back the
float32 scale. Rows that are not a whole number of 256-value blocks are written as F16 values, as llama.cpp's
own converter does. Norms are F32; the embedding, and an untied output head, are F16, F32, Q8_0, Q6_K or Q4_0.
Tensors are made and written one at a time, so writing needs about one tensor's worth of extra memory, not the
model's.

Architectures, as llama.cpp (the build vendored by llama-cpp-python 0.3.36) runs them:
- ternlm "bitnet" -> GGUF `bitnet`: both sub-norms, NEOX RoPE (the Hugging Face rotate-half layout, so q
  and k are written as they are), head tied to `token_embd`. That build gates the FFN with SiLU whatever
  the file says (1bitLLM's bitnet_b1_58 models). `bitnet.hidden_activation` records the model's own
  activation; newer llama.cpp reads that key, and it maps "silu" but (at this writing) not "relu2".
  A relu² model (BitNet b1.58 2B4T) is therefore written as `bitnet` with a warning: a reader that
  honours the key (ternlm's should) gets relu², llama.cpp computes SiLU. llama.cpp has no relu² BitNet
  architecture, and bitnet.cpp's `bitnet-b1.58` is not known to llama.cpp or gguf-py.
- ternlm "llama" (ternary Llama: SiLU, no sub-norms) -> GGUF `llama`. llama.cpp rotates interleaved
  pairs there, so the rows of q and k are reordered per head from rotate-half to interleaved order, as
  llama.cpp's own converter does; a reader must undo that.
- I2_S files: bitnet.cpp's `bitnet-b1.58` (its name for BitNet b1.58 2B4T: relu², both sub-norms, NEOX RoPE,
  head tied to `token_embd`), the only architecture that reads I2_S. bitnet.cpp rejects a file with tensors it
  does not create, so there are no `.scale` tensors (none are needed: the scale is float32).

The tokenizer must be a byte-level BPE (GPT-2, Llama 3, Qwen 2 families): `tokenizer.ggml.model` "gpt2".
`tokenizer.ggml.pre`, which selects llama.cpp's word-splitting regex, is taken from the tokenizer's own
split regex; see ``PRE_TOKENIZERS``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ternlm import ternary
from ternlm.errors import FormatError, ParamError, TernlmError
from ternlm.formats import ggml
from ternlm.layers import FloatMatrix, Q4Matrix, Q8Matrix, TernaryLinear
from ternlm.paths import replacing

if TYPE_CHECKING:
    from ternlm.config import ModelConfig
    from ternlm.formats import LoadedModel
    from ternlm.model import ModelWeights
    from ternlm.tokenizer import Tokenizer

TERNARY_TYPES = ("TQ2_0", "TQ1_0", "I2_S", "F16")  # F16: the same values in full precision, the float baseline
HEAD_TYPES = ("F16", "F32", "Q8_0", "Q6_K", "Q4_0")
# Columns per block of each type: a row must hold a whole number of blocks.
BLOCK_COLS = {"TQ2_0": 256, "TQ1_0": 256, "I2_S": 128, "Q6_K": 256, "Q8_0": 32, "Q4_0": 32, "F16": 1, "F32": 1}
I2S_FILE_TYPE = 40  # bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S (gguf-py knows neither it nor the I2_S type)
CHUNK_ROWS = 4096  # rows converted at a time: bounds the float32 temporaries of a 128k-row embedding

# The tokenizer's split regex -> llama.cpp `tokenizer.ggml.pre` name with the same regex. A tokenizer
# that splits otherwise gets "gpt-2" and a warning: GPT-2's split is what a plain ByteLevel
# pre-tokenizer does, and ids then differ only where the two splits disagree.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt-2"}
FALLBACK_PRE = "gpt-2"

# llama.cpp refuses a BPE vocabulary without a merges key, and gguf-py drops empty arrays: a vocabulary
# with no merges (bytes only) gets this one, which never applies: its parts are two characters long, and
# with no other merge every symbol is one character.
NO_MERGE = "<| |>"

# ggml token types (llama.cpp llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class _Tensor:
    """One tensor of the file: its GGUF name, numpy-order shape, type, and how to make its data."""

    name: str
    shape: tuple[int, ...]  # (cols,) for a vector, (rows, cols) for a matrix
    qtype: str
    make: Callable[[], np.ndarray]  # -> the block bytes, or the float32/float16 values of F32/F16

    @property
    def cols(self) -> int:
        return self.shape[-1]


def write_gguf(model: LoadedModel, out: str | Path, ternary_type: str = "TQ2_0", head_type: str = "F16",
               name: str | None = None) -> Path:
    """Write `model` (from ``ternlm.formats.open_model``) to the GGUF file `out`; returns its path.

    ternary_type: "TQ2_0" or "TQ1_0" for the seven projections of every layer, "I2_S" for a file that
    bitnet.cpp runs (arch `bitnet-b1.58`; relu² BitNet models only), or "F16" for the same values
    in full precision (what a float model's file holds: the baseline to compare with). head_type: "F16", "F32",
    "Q8_0", "Q6_K" or "Q4_0" for the embedding and an untied head (a Q8_0/Q4_0 head of a model loaded
    with ternlm's head quantization is copied bit for bit). name: `general.name` (default: the file's
    stem). The file appears only when complete (written beside it, then renamed).
    """
    ternary_type, head_type = _check_type(ternary_type, TERNARY_TYPES, "ternary_type"), \
        _check_type(head_type, HEAD_TYPES, "head_type")
    config, weights = getattr(model, "config", None), getattr(model, "weights", None)
    if config is None or weights is None:
        raise ParamError(f"model must be a LoadedModel (from ternlm.formats.open_model), got {type(model).__name__}")
    if name is not None and not isinstance(name, str):
        raise ParamError(f"name must be a string, got {type(name).__name__}")
    out = Path(out)
    if out.is_dir():
        raise ParamError(f"{out}: is a directory; give the path of the .gguf file to write")
    if not out.parent.is_dir():
        raise ParamError(f"{out.parent}: no such directory")
    gguf = _import_gguf()
    arch = _gguf_arch(config, weights, ternary_type)
    tensors = list(_tensors(config, weights, arch, ternary_type, head_type))
    for t in tensors:
        if t.cols % BLOCK_COLS[t.qtype]:
            raise FormatError(f"cannot write {t.name} {list(t.shape)} as {t.qtype}: its rows of {t.cols} "
                              f"values are not a whole number of {BLOCK_COLS[t.qtype]}-value blocks; "
                              f"choose another head_type (F16 always fits)")
    fallback = [t.name for t in tensors if t.name.startswith("blk.") and t.qtype == "F16"]
    if fallback:
        warnings.warn(f"{len(fallback)} ternary tensors ({', '.join(fallback[:3])}, ...) have rows that are not a "
                      f"whole number of 256-value {ternary_type} blocks; they are written as F16 (the same values, "
                      "8x the bytes), as llama.cpp's own converter does",
                      stacklevel=2)

    with replacing(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            _write_metadata(writer, gguf, config, arch, ternary_type, name if name is not None else out.stem)
            _write_vocab(writer, gguf, getattr(model, "tokenizer", None), config)
            for t in tensors:
                type_id = ggml.I2_S if t.qtype == "I2_S" else gguf.GGMLQuantizationType[t.qtype]
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), ggml.tensor_nbytes(type_id, t.shape),
                                       raw_dtype=type_id)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                writer.write_tensor_data(np.ascontiguousarray(t.make()))
        finally:
            writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return out


def _check_type(value: str, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.upper() not in allowed:
        raise ParamError(f"{what} must be one of {allowed}, got {value!r}")
    return value.upper()


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise TernlmError("writing GGUF files needs the `gguf` package (pip install gguf)") from e
    return gguf


def _gguf_arch(c: ModelConfig, w: ModelWeights, ternary_type: str) -> str:
    """The llama.cpp (bitnet.cpp for I2_S) architecture that computes this model, or a FormatError saying why
    there is none."""
    has_sub_norms = [lw.attn_sub_norm is not None and lw.ffn_sub_norm is not None for lw in w.layers]
    if ternary_type == "I2_S":
        if c.arch != "bitnet" or c.hidden_act != "relu2" or not all(has_sub_norms):
            raise FormatError("I2_S is bitnet.cpp's, whose `bitnet-b1.58` computes relu² BitNet models with both "
                              f"sub-norms (2B4T's kind); this is a {c.hidden_act} {c.arch} model: write TQ2_0 or TQ1_0")
        if w.head is not w.embed:
            raise FormatError("bitnet.cpp's `bitnet-b1.58` has no separate output head (it multiplies by "
                              "token_embd); this model has one, so it cannot be written as I2_S")
        return "bitnet-b1.58"
    if c.arch == "bitnet":
        if not all(has_sub_norms):
            raise FormatError("a bitnet model without attn_sub_norm/ffn_sub_norm in every layer has no GGUF "
                              "architecture (llama.cpp's `bitnet` requires both)")
        if c.q_dim != c.dim:
            raise FormatError(f"llama.cpp's `bitnet` needs heads x head_dim = hidden size; got "
                              f"{c.n_heads} x {c.head_dim} != {c.dim}")
        if w.head is not w.embed:
            raise FormatError("llama.cpp's `bitnet` has no separate output head (it multiplies by token_embd); "
                              "this model has one, so it cannot be written as GGUF")
        if c.hidden_act == "relu2":
            warnings.warn("writing a relu² BitNet (2B4T style) as GGUF arch `bitnet`: llama.cpp "
                          "(0.3.36's build) computes that arch with SiLU and will give different logits; the "
                          "file records relu2 in bitnet.hidden_activation for readers that honour it", stacklevel=3)
        return "bitnet"
    if any(has_sub_norms):
        raise FormatError("a llama model with sub-norms has no GGUF architecture")
    if c.hidden_act != "silu":
        raise FormatError(f"llama.cpp's `llama` computes SiLU; this model uses {c.hidden_act}")
    return "llama"


def _write_metadata(writer: Any, gguf: Any, c: ModelConfig, arch: str, ternary_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(I2S_FILE_TYPE if ternary_type == "I2_S" else gguf.LlamaFileType[f"MOSTLY_{ternary_type}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    if c.head_dim != c.dim // c.n_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if arch == "bitnet":
        writer.add_string(f"{arch}.hidden_activation", c.hidden_act)


# ---- tensors --------------------------------------------------------------------------------------


def _tensors(c: ModelConfig, w: ModelWeights, arch: str, ternary_type: str, head_type: str) -> Iterator[_Tensor]:
    """Every tensor of the file, in llama.cpp's usual order, each with a function that makes its data."""
    yield _matrix("token_embd.weight", w.embed, head_type)
    yield _vector("output_norm.weight", w.norm)
    if w.head is not w.embed:
        yield _matrix("output.weight", w.head, head_type)
    for i, lw in enumerate(w.layers):
        p = f"blk.{i}."
        q_rows, kv_rows = (_interleave_rows(c.q_dim, c.n_heads), _interleave_rows(c.kv_dim, c.n_kv_heads)) \
            if arch == "llama" else (None, None)
        q0, k0, v0 = 0, c.q_dim, c.q_dim + c.kv_dim
        yield _vector(p + "attn_norm.weight", lw.attn_norm)
        if lw.attn_sub_norm is not None:
            yield _vector(p + "attn_sub_norm.weight", lw.attn_sub_norm)
        yield from _projection(p + "attn_q.weight", lw.qkv, q0, k0, ternary_type, q_rows)
        yield from _projection(p + "attn_k.weight", lw.qkv, k0, v0, ternary_type, kv_rows)
        yield from _projection(p + "attn_v.weight", lw.qkv, v0, v0 + c.kv_dim, ternary_type)
        yield from _projection(p + "attn_output.weight", lw.o, 0, c.dim, ternary_type)
        yield _vector(p + "ffn_norm.weight", lw.ffn_norm)
        if lw.ffn_sub_norm is not None:
            yield _vector(p + "ffn_sub_norm.weight", lw.ffn_sub_norm)
        yield from _projection(p + "ffn_gate.weight", lw.gate_up, 0, c.ffn_dim, ternary_type)
        yield from _projection(p + "ffn_up.weight", lw.gate_up, c.ffn_dim, 2 * c.ffn_dim, ternary_type)
        yield from _projection(p + "ffn_down.weight", lw.down, 0, c.dim, ternary_type)


def _interleave_rows(n_rows: int, heads: int) -> np.ndarray:
    """Row order that turns rotate-half RoPE rows (pairs i, i + d/2 of each head) into interleaved ones
    (pairs 2i, 2i + 1): new row h*d + 2i + j is old row h*d + j*d/2 + i."""
    return np.arange(n_rows).reshape(heads, 2, n_rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _vector(name: str, v: np.ndarray) -> _Tensor:
    return _Tensor(name, (len(v),), "F32", lambda: np.asarray(v, np.float32))


def _projection(name: str, lin: TernaryLinear, r0: int, r1: int, type_name: str,
                order: np.ndarray | None = None) -> Iterator[_Tensor]:
    """Rows [r0, r1) of a (possibly stacked) ternary layer, each row's values times its own scale; and,
    when the tensor has one scale that float16 cannot hold, `<base>.scale` with the ratio (see the top)."""
    if r1 > lin.out_features:
        raise FormatError(f"{name}: the layer has {lin.out_features} rows, the config implies {r1}")
    # A layer read from a TQ file whose blocks disagree within a row is a sum of parts, one per scale
    # (formats.gguf's BlockScaledLinear); every other layer is one part.
    n_parts = getattr(lin, "n_parts", 1)
    parts = [lin.part(j) for j in range(n_parts)] if n_parts > 1 else [lin]
    scales = [np.broadcast_to(np.asarray(p.scale, np.float32), (lin.out_features,))[r0:r1] for p in parts]
    if type_name == "I2_S" and (n_parts > 1 or np.any(scales[0] != scales[0][0])):  # one float32 per tensor
        raise FormatError(f"{name}: its rows have different weight scales, and I2_S holds one per tensor; "
                          "write TQ2_0 or TQ1_0 (a scale per block)")
    for s in scales if type_name != "I2_S" else []:  # TQ: one float16 scale per block
        half = s.astype(np.float16)
        bad = ~(np.isfinite(half) & (s >= 0) & ((half > 0) | (s == 0)))
        if bad.any():
            raise FormatError(f"{name}: weight scale {s[bad][0]} cannot be stored as a float16 block scale")
    # llama.cpp needs whole 256-value blocks per row; other rows are stored as F16 values (the same values).
    if lin.in_features % BLOCK_COLS[type_name]:
        type_name = "F16"

    def make() -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        codes = [p.codes(r0, r1) for p in parts]
        s = scales
        if order is not None:
            codes, s = [c[order] for c in codes], [x[order] for x in s]
        if type_name == "I2_S":
            return i2_s_bytes(codes[0], s[0][0])
        out = []
        for i in range(0, r1 - r0, CHUNK_ROWS):
            if type_name == "TQ2_0" and n_parts == 1:  # straight from the codes: no float round trip
                out.append(tq2_0_bytes(codes[0][i:i + CHUNK_ROWS], s[0][i:i + CHUNK_ROWS]))
                continue
            x = sum((c[i:i + CHUNK_ROWS].astype(np.float32) - 1) * sc[i:i + CHUNK_ROWS, None]
                    for c, sc in zip(codes, s, strict=True))
            if type_name != "F16" and n_parts > 1:
                _check_one_scale_per_block(name, x)
            out.append(x.astype(np.float16) if type_name == "F16" else quantize(x, GGMLQuantizationType[type_name]))
        return np.concatenate(out)

    yield _Tensor(name, (r1 - r0, lin.in_features), type_name, make)
    first = scales[0][0]
    if type_name != "I2_S" and n_parts == 1 and np.all(scales[0] == first) and np.float32(np.float16(first)) != first:
        ratio = _ratio(first)
        yield _Tensor(name.removesuffix(".weight") + ".scale", (1,), "F32", lambda: np.array([ratio], np.float32))


def tq2_0_bytes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """codes w+1 (rows, k), k % 256 == 0, and one scale per row -> ggml TQ2_0 blocks (rows, k/256 * 66).

    A block: 64 bytes, byte 32h + m holding elements 128h + m + 32n at bits 2n (n = 0..3), then the float16 d.
    """
    rows, k = codes.shape
    c = codes.reshape(rows, k // 128, 4, 32)
    qs = (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).reshape(rows, k // 256, 64)
    d = np.repeat(np.asarray(scale, np.float16).reshape(rows, 1), k // 256, axis=1)
    return np.concatenate([qs, d.view(np.uint8).reshape(rows, k // 256, 2)], axis=2).reshape(rows, -1)


def i2_s_bytes(codes: np.ndarray, scale: np.float32) -> np.ndarray:
    """codes w+1 (rows, k), rows * k % 128 == 0, and the tensor's scale -> bitnet.cpp's I2_S bytes (x86 layout).

    The tensor is one row-major run of 128-value blocks of 32 bytes: byte j of a block holds values j, 32 + j,
    64 + j, 96 + j in bits 7-6, 5-4, 3-2, 1-0. Then the float32 scale, padded to 32 bytes.
    """
    c = codes.reshape(-1, 4, 32)
    packed = c[:, 0] << 6 | c[:, 1] << 4 | c[:, 2] << 2 | c[:, 3]
    tail = np.zeros(ggml.I2S_TAIL, np.uint8)
    tail[:4] = np.array([scale], "<f4").view(np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def _ratio(s: np.float32) -> np.float32:
    """r such that float32(float16(s)) * r == s in float32 arithmetic (when one exists; the nearest r else)."""
    h = np.float32(np.float16(s))
    r = np.float32(s / h)
    for candidate in (r, np.nextafter(r, np.float32(2)), np.nextafter(r, np.float32(0))):
        if h * candidate == s:
            return candidate
    return r


def _check_one_scale_per_block(name: str, x: np.ndarray) -> None:
    """A TQ block holds one scale: a block-scaled layer whose parts share a block cannot be written."""
    mag = np.abs(x).reshape(len(x), -1, BLOCK_COLS["TQ2_0"])
    hi = mag.max(axis=2)
    lo = np.where(mag > 0, mag, np.inf).min(axis=2)
    if np.any((hi > 0) & (lo != hi)):
        raise FormatError(f"{name}: a 256-value block mixes weights of different scales; TQ blocks hold one scale")


def _matrix(name: str, m: FloatMatrix | Q8Matrix | Q4Matrix, qtype: str) -> _Tensor:
    """The embedding or the head in `qtype`, converted CHUNK_ROWS rows at a time."""
    rows, cols = m.shape

    def chunk(r0: int, r1: int) -> np.ndarray:
        if qtype == "Q8_0" and isinstance(m, Q8Matrix):
            return _q8_0_bytes(m.q[r0:r1], m.d[r0:r1])
        if qtype == "Q4_0" and isinstance(m, Q4Matrix):
            return _q4_0_bytes(m.q4[r0:r1], m.d[r0:r1])
        x = m.rows(np.arange(r0, r1))
        if qtype == "F32":
            return x
        if qtype == "F16":
            half = x.astype(np.float16)
            if not np.all(np.isfinite(half)):
                raise FormatError(f"{name}: values beyond float16's range; write head_type F32 instead")
            return half
        if qtype == "Q8_0":
            return _q8_0_bytes(*ternary.quantize_q8_0(x))
        if qtype == "Q4_0":
            return _q4_0_bytes(*ternary.quantize_q4_0(x))
        return quantize_q6_k(x)

    return _Tensor(name, (rows, cols), qtype,
                   lambda: np.concatenate([chunk(r, min(r + CHUNK_ROWS, rows)) for r in range(0, rows, CHUNK_ROWS)]))


def _q8_0_bytes(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ternlm's Q8_0 (int8 values, float16 scale per 32) as ggml block_q8_0: the scale, then 32 values."""
    n, nb = d.shape
    return np.concatenate([d.view(np.uint8).reshape(n, nb, 2), q.view(np.uint8).reshape(n, nb, 32)],
                          axis=2).reshape(n, nb * 34)


def _q4_0_bytes(q4: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ternlm's Q4_0 nibbles already have ggml's layout (value j low, j + 16 high, stored + 8): prepend d."""
    n, nb = d.shape
    return np.concatenate([d.view(np.uint8).reshape(n, nb, 2), q4.reshape(n, nb, 16)], axis=2).reshape(n, nb * 18)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> ggml block_q6_K bytes (gguf-py has no Q6_K quantizer).

    Plain absmax per 16-value sub-block (6-bit values in [-31, 31], int8 sub-block scales, one float16
    super-block scale), not llama.cpp's error-minimizing search; the byte layout is ggml's exactly.
    """
    n = x.size // 256
    b = x.reshape(n, 16, 16)
    sub = np.abs(b).max(-1) / 31  # (n, 16) step per 16-value sub-block
    d = (sub.max(-1, keepdims=True) / 127).astype(np.float16)
    sc = np.round(sub / np.maximum(d.astype(np.float32), 1e-30)).clip(-128, 127).astype(np.int8)
    step = np.maximum(d.astype(np.float32) * sc, 1e-30)[..., None]
    q = (np.round(b / step).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 256)
    lo, hi = (q & 15).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = lo[:, :, 0] | lo[:, :, 1] << 4
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8)],
                          axis=-1).reshape(x.shape[0], -1)


# ---- tokenizer ------------------------------------------------------------------------------------


def _write_vocab(writer: Any, gguf: Any, tokenizer: Tokenizer | None, c: ModelConfig) -> None:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary, padded to the embedding's rows."""
    if tokenizer is None:
        # llama.cpp's "no vocab": it then takes the vocabulary size from the embedding and runs token ids.
        warnings.warn("the model has no tokenizer: the GGUF gets none (tokenizer.ggml.model \"no_vocab\") and "
                      "runs on token ids only", stacklevel=3)
        writer.add_tokenizer_model("no_vocab")  # gguf-py's name for it; bitnet.cpp reads only this one
        return
    data = json.loads(tokenizer.to_json())
    bpe = data.get("model") or {}
    if bpe.get("type") != "BPE" or not _byte_level(data):
        raise FormatError(f"only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2 style) can be written to GGUF; "
                          f"this one is a {bpe.get('type')} model without a ByteLevel pre-tokenizer")
    n = c.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    entries = [(text, i, NORMAL) for text, i in bpe.get("vocab", {}).items()]
    entries += [(t["content"], t["id"], CONTROL if t.get("special") else USER_DEFINED)
                for t in data.get("added_tokens", [])]
    for text, i, kind in entries:
        if not 0 <= i < n:
            raise FormatError(f"the tokenizer has token {text!r} with id {i}, but the model's embedding has "
                              f"{n} rows")
        tokens[i], types[i] = text, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    pre = _pre_tokenizer(data) if merges else FALLBACK_PRE  # no merges: every split gives the same ids

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges or [NO_MERGE])
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else c.bos_id
    eos = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
    eos = eos if eos is not None else (c.eos_ids[0] if c.eos_ids else None)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_add_bos_token(bool(tokenizer.add_bos_token and bos is not None))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_items(data: dict) -> list[dict]:
    pre = data.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _byte_level(data: dict) -> bool:
    """Byte-level BPE: a ByteLevel pre-tokenizer (or, failing that, decoder) maps bytes to printable chars."""
    decoder = data.get("decoder") or {}
    return any(p.get("type") == "ByteLevel" for p in _pre_items(data)) or decoder.get("type") == "ByteLevel"


def _pre_tokenizer(data: dict) -> str:
    """llama.cpp's name for the tokenizer's word-splitting regex (see PRE_TOKENIZERS)."""
    items = [p for p in _pre_items(data) if p]
    regexes = [p["pattern"].get("Regex") for p in items
               if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    regexes += [GPT2_REGEX for p in items if p.get("type") == "ByteLevel" and p.get("use_regex", True)]
    others = [p.get("type") for p in items if p.get("type") not in ("Split", "ByteLevel")]
    if len(regexes) == 1 and not others and regexes[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regexes[0]]
    warnings.warn(f"the tokenizer splits words with {regexes or 'no regex'} (and {others or 'nothing else'}), "
                  f"which matches no llama.cpp pre-tokenizer; writing {FALLBACK_PRE!r}: llama.cpp's token ids "
                  "may differ from the tokenizer's around word boundaries", stacklevel=4)
    return FALLBACK_PRE
