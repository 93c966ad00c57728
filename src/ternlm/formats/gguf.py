"""Read GGUF files (llama.cpp, bitnet.cpp) into ternlm's config, weights and tokenizer.

The header is parsed here rather than with gguf-py's GGUFReader: that reader does not know bitnet.cpp's
I2_S type (36) and trusts the lengths it reads. Every count, length, offset and size is checked against
the file before anything is allocated, and every problem becomes a FormatError naming the file.

Architectures (`general.architecture`):
- "bitnet-b1.58" (and its first name "bitnet-25"): microsoft/bitnet-b1.58-2B-4T from bitnet.cpp: relu²
  gated FFN, sub-norms before o_proj and down_proj, rotate-half RoPE.
- "bitnet": llama.cpp's name for 1bitLLM's bitnet_b1_58 models: the same with a SiLU FFN.
- "llama": ternary Llamas (Falcon3-1.58bit, Llama3-8B-1.58) and any float Llama, ternarized on load.
  Converters permute the q and k rows of llama-arch files for llama.cpp's adjacent-pair RoPE; the
  permutation is undone here so that ternlm's rotate-half RoPE sees the Hugging Face row order.
An `<arch>.hidden_activation` key ("relu2" or "silu", written by ternlm's GGUF writer) overrides the
architecture's FFN activation.

Projection types: I2_S (codes plus one float32 scale per tensor), TQ1_0 / TQ2_0 (a float16 scale per
256-column block), and any float or quantized type, dequantized then ternarized with the per-tensor
absmean rule (or read as ternary when its values already are ±s and 0, as converters write BitNet weights).
An optional `<tensor>.scale` (llama.cpp) multiplies the output. TQ block scales are kept exactly: one
scale per row when the blocks of each row agree (always, for files made from a BitNet model), otherwise
a BlockScaledLinear. Embeddings and heads: F32, F16 and BF16 stay as they are, Q8_0 and Q4_0 become
ternlm's Q8/Q4 matrices unchanged, other types (Q6_K, ...) are dequantized to float32.

I2_S's block layout depends on the machine that quantized it (see ggml.decode_i2_s) and the file does
not say which. Rule: 128-element blocks (every file written before bitnet.cpp's 2025-11 change, every
x86-made file, Microsoft's published GGUFs, and bitnet.cpp's Python converter), unless the caller passes
i2s_block=64 or the environment sets TERNLM_I2S_BLOCK=64 for a file quantized on ARM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ternlm import chat, ternary
from ternlm.config import ACTIVATIONS, ModelConfig
from ternlm.errors import FormatError, ShapeError
from ternlm.formats import LoadedModel, ggml
from ternlm.layers import FloatMatrix, Q4Matrix, Q8Matrix, TernaryLinear
from ternlm.model import LayerWeights, ModelWeights
from ternlm.tokenizer import Tokenizer

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 16
MAX_CONTEXT = 1 << 24  # a longer context_length is a lying header, not a model
I2S_ENV = "TERNLM_I2S_BLOCK"
# bitnet.cpp's converter writes a template with this in it into 2B4T GGUFs; the model loops under it.
BROKEN_BITNET_TEMPLATE_MARKER = "BITNETAssistant"

# GGUF metadata value types: id -> struct format of a scalar (8 string, 9 array handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                 11: "<i8", 12: "<f8"}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    arch: str  # ternlm's: "bitnet" or "llama"
    hidden_act: str
    sub_norms: bool  # attn_sub_norm / ffn_sub_norm present and used
    permuted_qk: bool  # q/k rows permuted for llama.cpp's adjacent-pair RoPE


ARCHS = {
    "bitnet-b1.58": ArchSpec("bitnet", "relu2", True, False),
    "bitnet-25": ArchSpec("bitnet", "relu2", True, False),
    "bitnet": ArchSpec("bitnet", "silu", True, False),
    "llama": ArchSpec("llama", "silu", False, True),
}
LINEARS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
           "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


# ---- the container --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int  # ggml type
    shape: tuple[int, ...]  # numpy order (GGUF's dimensions reversed): the last axis is contiguous
    offset: int  # of the data, from the start of the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata, its tensors' places, and the file mapped read-only."""

    path: Path
    version: int
    metadata: dict[str, Any]  # ints, floats, bools, strs; arrays as numpy arrays or lists of str
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # the whole file, uint8, memory-mapped

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor `name`: a uint8 view into the mapped file."""
        t = self.tensors[name]
        return self.data[t.offset:t.offset + t.nbytes]


class _Cursor:
    """Reads the header from the mapped file; every read is checked against the bytes left."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise FormatError(f"{self.path}: truncated header: {what} needs {n} bytes at offset {self.pos}, "
                              f"{self.left()} left")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, f"{what} ({n}-byte string)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8 ({e})") from e

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _BOOL:
            return self.scalar("<B", what) != 0
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _ARRAY:
            return self.array(what)
        raise FormatError(f"{self.path}: {what} has unknown value type {vtype}")

    def array(self, what: str) -> Any:
        etype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if etype == _STRING:
            if count > self.left() // 8:  # each string takes at least its 8-byte length
                raise FormatError(f"{self.path}: {what}: array of {count} strings cannot fit in the "
                                  f"{self.left()} bytes left")
            return [self.string(f"{what}[{i}]") for i in range(count)]
        if etype in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[etype])
            if count > self.left() // dtype.itemsize:
                raise FormatError(f"{self.path}: {what}: array of {count} x {dtype.itemsize} bytes cannot fit "
                                  f"in the {self.left()} bytes left")
            arr = np.frombuffer(self.buf, dtype, count, self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr != 0 if etype == _BOOL else arr
        if etype == _ARRAY:
            raise FormatError(f"{self.path}: {what}: nested arrays are not supported")
        raise FormatError(f"{self.path}: {what}: array of unknown value type {etype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at `path` and map its data; nothing is trusted unchecked."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    if size < 24:
        raise FormatError(f"{path}: file is {size} bytes, too short for a GGUF header")
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot map: {e}") from e
    cur = _Cursor(memoryview(data), path)
    if bytes(cur.buf[:4]) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
            raise FormatError(f"{path}: big-endian GGUF is not supported")
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    if n_kv > cur.left() // 13 or n_tensors > cur.left() // 24:  # smallest possible entries
        raise FormatError(f"{path}: header claims {n_kv} metadata entries and {n_tensors} tensors, more than "
                          f"the {size}-byte file can hold")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"type of {key!r}")
        if key in metadata:
            raise FormatError(f"{path}: metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", 32)
    if not _is_int(alignment) or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment {alignment!r} is not a power of two up to {MAX_ALIGNMENT}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.scalar("<I", f"dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.scalar("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]
        if any(d >= 1 << 62 for d in dims):
            raise FormatError(f"{path}: tensor {name!r} has a negative or absurd dimension in {dims}")
        type_id = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"offset of {name!r}")
        infos.append((name, type_id, tuple(reversed(dims)), offset))

    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, type_id, shape, offset in infos:
        where = f"{path}: tensor {name!r}"
        if name in tensors:
            raise FormatError(f"{where} appears twice")
        try:
            nbytes = ggml.tensor_nbytes(type_id, shape)
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from e
        if offset % alignment:
            raise FormatError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        start = data_start + offset
        if start + nbytes > size:
            raise FormatError(f"{where}: {ggml.type_name(type_id)} {list(shape)} needs {nbytes} bytes at offset "
                              f"{start}, beyond the end of the {size}-byte file (truncated?)")
        tensors[name] = TensorInfo(name, type_id, shape, start, nbytes)
    return GGUFFile(path, version, metadata, tensors, data)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- the model ------------------------------------------------------------------------------------


def load_gguf(path: str | Path, i2s_block: int | None = None) -> LoadedModel:
    """Config, weights and tokenizer of the GGUF model at `path`.

    i2s_block: elements per I2_S block, 128 or 64 (see the module notes); default $TERNLM_I2S_BLOCK or 128.
    """
    f = read_gguf(path)
    block = _i2s_block(i2s_block)
    arch_name = f.metadata.get("general.architecture")
    if arch_name not in ARCHS:
        raise FormatError(f"{f.path}: architecture {arch_name!r} is not supported; ternlm reads {sorted(ARCHS)}")
    spec = ARCHS[arch_name]
    act = _meta(f, f"{arch_name}.hidden_activation", str)
    if act is not None:  # written by ternlm's GGUF writer (a relu² BitNet under llama.cpp's `bitnet`)
        if act not in ACTIVATIONS:
            raise FormatError(f"{f.path}: {arch_name}.hidden_activation {act!r} is not one of {sorted(ACTIVATIONS)}")
        spec = dataclasses.replace(spec, hidden_act=act)
    elif arch_name in ("bitnet-b1.58", "bitnet-25") and f.metadata.get("tokenizer.ggml.model") == "llama":
        # bitnet.cpp's converter files 1bitLLM's models (SentencePiece vocab, trained with SiLU) under the
        # 2B4T architecture name too; run them as trained.
        spec = dataclasses.replace(spec, hidden_act="silu")
    config = _config(f, arch_name, spec)
    _check_tensors(f, config, spec)
    tokenizer = tokenizer_from_gguf(f, arch_name)
    weights = _weights(f, config, spec, block)
    return LoadedModel(config, weights, tokenizer)


def _i2s_block(requested: int | None) -> int:
    if requested is None:
        env = os.environ.get(I2S_ENV, "").strip()
        if not env:
            return ggml.I2S_BLOCKS[0]
        try:
            requested = int(env)
        except ValueError:
            raise FormatError(f"${I2S_ENV} must be 128 or 64, got {env!r}") from None
    if requested not in ggml.I2S_BLOCKS:
        raise FormatError(f"I2_S block size must be 128 or 64, got {requested!r}")
    return requested


def _meta(f: GGUFFile, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
    """Metadata `key` checked to be of `kind` (int or float: any number; str; bool)."""
    if key not in f.metadata:
        if required:
            raise FormatError(f"{f.path}: missing required metadata {key!r}")
        return default
    v = f.metadata[key]
    ok = {int: _is_int(v), float: _is_int(v) or isinstance(v, float), str: isinstance(v, str),
          bool: isinstance(v, bool)}[kind]
    if not ok:
        raise FormatError(f"{f.path}: metadata {key!r} should be {kind.__name__}, got {type(v).__name__} {v!r:.60}")
    return float(v) if kind is float else v


def _config(f: GGUFFile, arch_name: str, spec: ArchSpec) -> ModelConfig:
    p = arch_name + "."

    def num(key: str, default: int | None = None) -> int:
        return _meta(f, p + key, int, default, required=default is None)

    dim, n_heads = num("embedding_length"), num("attention.head_count")
    head_dim = num("attention.key_length", 0) or (dim // n_heads if n_heads > 0 else 0)
    if num("attention.value_length", head_dim) != head_dim:
        raise FormatError(f"{f.path}: attention value length differs from the key length {head_dim}")
    rot = num("rope.dimension_count", head_dim)
    if rot != head_dim:
        raise FormatError(f"{f.path}: RoPE over {rot} of {head_dim} head dimensions is not supported")
    scaling = _meta(f, p + "rope.scaling.type", str, "none")
    factor = _meta(f, p + "rope.scaling.factor", float, 1.0)
    if scaling not in ("none", "linear") or factor not in (0.0, 1.0) \
            or _meta(f, p + "rope.scale_linear", float, 1.0) != 1.0:
        raise FormatError(f"{f.path}: RoPE scaling {scaling!r} x {factor} is not supported")
    theta = _meta(f, p + "rope.freq_base", float, 10_000.0)
    eps = _meta(f, p + "attention.layer_norm_rms_epsilon", float, 1e-5)
    context = num("context_length", 2048)
    if not (math.isfinite(theta) and theta > 1.0 and math.isfinite(eps) and 0 < eps < 1 and context <= MAX_CONTEXT):
        raise FormatError(f"{f.path}: implausible rope.freq_base {theta}, rms epsilon {eps} or context {context}")
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise FormatError(f"{f.path}: missing tensor 'token_embd.weight'")
    vocab = _squeeze(embd.shape)[0] if len(_squeeze(embd.shape)) == 2 else 0
    if num("vocab_size", vocab) != vocab:
        raise FormatError(f"{f.path}: {p}vocab_size {num('vocab_size')} but token_embd has {vocab} rows")
    eos_ids = tuple(i for i in (_meta(f, f"tokenizer.ggml.{k}_token_id", int) for k in ("eos", "eot", "eom"))
                    if i is not None)
    fields = {"arch": spec.arch, "dim": dim, "n_layers": num("block_count"), "n_heads": n_heads,
              "n_kv_heads": num("attention.head_count_kv", n_heads), "ffn_dim": num("feed_forward_length"),
              "vocab_size": vocab, "head_dim": head_dim, "hidden_act": spec.hidden_act, "rope_theta": theta,
              "norm_eps": eps, "max_seq_len": context, "tie_embeddings": "output.weight" not in f.tensors,
              "scale_mode": "multiply", "bos_id": _meta(f, "tokenizer.ggml.bos_token_id", int),
              "eos_ids": tuple(dict.fromkeys(eos_ids))}
    try:
        return ModelConfig(**fields)
    except (FormatError, ZeroDivisionError) as e:
        raise FormatError(f"{f.path}: {e}") from e


def _shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected numpy shapes (rows, cols) of each per-layer tensor, by GGUF suffix."""
    return {"attn_q": (c.q_dim, c.dim), "attn_k": (c.kv_dim, c.dim), "attn_v": (c.kv_dim, c.dim),
            "attn_output": (c.dim, c.q_dim), "ffn_gate": (c.ffn_dim, c.dim), "ffn_up": (c.ffn_dim, c.dim),
            "ffn_down": (c.dim, c.ffn_dim), "attn_norm": (c.dim,), "ffn_norm": (c.dim,),
            "attn_sub_norm": (c.q_dim,), "ffn_sub_norm": (c.ffn_dim,)}


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Leading size-1 axes dropped: GGUF writers differ in how many trailing unit dimensions they keep."""
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return shape[i:]


def _check_tensors(f: GGUFFile, c: ModelConfig, spec: ArchSpec) -> None:
    """Every tensor the model needs is present with the shape the config implies (before decoding any)."""
    expected = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        expected["output.weight"] = (c.vocab_size, c.dim)
    per_layer = _shapes(c)
    if not spec.sub_norms:
        del per_layer["attn_sub_norm"], per_layer["ffn_sub_norm"]
    for i in range(c.n_layers):
        for suffix, shape in per_layer.items():
            expected[f"blk.{i}.{suffix}.weight"] = shape
            if f"blk.{i}.{suffix}.weight_scale" in f.tensors:
                raise FormatError(f"{f.path}: tensor 'blk.{i}.{suffix}.weight_scale' (bitnet.cpp TL1/TL2 layout) "
                                  "is not supported")
        if i % 64 == 63 or i == c.n_layers - 1:  # report a lying block_count early
            missing = [n for n in expected if n not in f.tensors]
            if missing:
                raise FormatError(f"{f.path}: missing tensor {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        got = f.tensors[name].shape
        if _squeeze(got) != _squeeze(shape):
            raise FormatError(f"{f.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    if "rope_freqs.weight" in f.tensors:
        factors = _vector(f, "rope_freqs.weight", f.tensors["rope_freqs.weight"].shape[-1])
        if not np.all(factors == 1.0):
            raise FormatError(f"{f.path}: RoPE frequency factors (rope_freqs.weight) are not supported")


def _weights(f: GGUFFile, c: ModelConfig, spec: ArchSpec, i2s_block: int) -> ModelWeights:
    shapes = _shapes(c)
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        lin = {}
        for key, suffix in LINEARS.items():
            parts = _ternary_parts(f, p + suffix, shapes[suffix], i2s_block)
            if spec.permuted_qk and key in ("q", "k"):
                order = unpermute_rows(c.n_heads if key == "q" else c.n_kv_heads, shapes[suffix][0])
                parts = [(codes[order], scale[order]) for codes, scale in parts]
            lin[key] = _linear(parts)
        layers.append(LayerWeights(
            attn_norm=_vector(f, p + "attn_norm.weight", c.dim), ffn_norm=_vector(f, p + "ffn_norm.weight", c.dim),
            attn_sub_norm=_vector(f, p + "attn_sub_norm.weight", c.q_dim) if spec.sub_norms else None,
            ffn_sub_norm=_vector(f, p + "ffn_sub_norm.weight", c.ffn_dim) if spec.sub_norms else None,
            qkv=concat([lin["q"], lin["k"], lin["v"]]), o=lin["o"],
            gate_up=concat([lin["gate"], lin["up"]]), down=lin["down"],
        ))
    embed = _matrix(f, "token_embd.weight", c.vocab_size, c.dim)
    head = embed if c.tie_embeddings else _matrix(f, "output.weight", c.vocab_size, c.dim)
    return ModelWeights(embed=embed, norm=_vector(f, "output_norm.weight", c.dim), head=head, layers=layers)


def unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation for adjacent-pair RoPE.

    The converter writes, per head, the rows of the first and second halves interleaved (row 2i of a head
    is HF row i, row 2i+1 is HF row head_dim/2 + i); indexing the file's rows with the result gives back
    the Hugging Face (rotate-half) order.
    """
    half = rows // n_heads // 2
    return np.arange(rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(rows)


def _vector(f: GGUFFile, name: str, n: int) -> np.ndarray:
    """A float32 copy of a 1-D tensor (norm weights): small, and a copy does not keep pages mapped."""
    t = f.tensors[name]
    try:
        return np.ascontiguousarray(ggml.dequantize(f.raw(name), t.type_id, 1, n).reshape(n))
    except ValueError as e:
        raise FormatError(f"{f.path}: tensor {name!r}: {e}") from e


def _matrix(f: GGUFFile, name: str, rows: int, cols: int) -> FloatMatrix | Q8Matrix | Q4Matrix:
    """The embedding or head in the closest form ternlm computes with."""
    t = f.tensors[name]
    raw = f.raw(name)
    try:
        if t.type_id in ggml.FLOAT_TYPES:  # a view of the mapped file, as for safetensors
            return FloatMatrix(raw.view(ggml.FLOAT_TYPES[t.type_id]).reshape(rows, cols), ggml.type_name(t.type_id))
        if t.type_id == ggml.Q8_0:
            q, d = ggml.decode_q8_0(raw, rows, cols)
            if not (q == -128).any():  # ggml never writes -128; ternlm's Q8 kernels assume [-127, 127]
                return Q8Matrix(q, d)
        elif t.type_id == ggml.Q4_0:
            return Q4Matrix(*ggml.decode_q4_0(raw, rows, cols))
        elif t.type_id == ggml.I2_S:
            raise ValueError("an I2_S embedding or head is not supported")
        return FloatMatrix(ggml.dequantize(raw, t.type_id, rows, cols), "F32")
    except ValueError as e:
        raise FormatError(f"{f.path}: tensor {name!r}: {e}") from e


# ---- ternary projections --------------------------------------------------------------------------

# A projection as parts (codes (out, in) uint8 in {0, 1, 2}, per-row scales (out,) float32) whose sum is
# the matrix: one part unless the rows of a TQ tensor carry different block scales.
Parts = list[tuple[np.ndarray, np.ndarray]]


def _ternary_parts(f: GGUFFile, name: str, shape: tuple[int, int], i2s_block: int) -> Parts:
    t = f.tensors[name + ".weight"]
    raw = f.raw(name + ".weight")
    out_f, in_f = shape
    where = f"{f.path}: tensor {name + '.weight'!r}"
    try:
        if t.type_id == ggml.I2_S:
            codes, scale = ggml.decode_i2_s(raw, out_f, in_f, i2s_block)
            parts = [(codes, np.full(out_f, scale, np.float32))]
        elif t.type_id in (ggml.TQ1_0, ggml.TQ2_0):
            decode = ggml.decode_tq1_0 if t.type_id == ggml.TQ1_0 else ggml.decode_tq2_0
            parts = block_scaled_parts(*decode(raw, out_f, in_f))
        else:
            parts = [_from_float(ggml.dequantize(raw, t.type_id, out_f, in_f))]
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from e
    extra = name + ".scale"
    if extra in f.tensors:  # llama.cpp's optional per-tensor output multiplier
        shape = f.tensors[extra].shape
        if math.prod(shape) != 1:
            raise FormatError(f"{f.path}: tensor {extra!r} must hold one number, has shape {list(shape)}")
        mult = float(_vector(f, extra, 1)[0])
        parts = [(codes, scale * np.float32(mult)) for codes, scale in parts]
    for _, scale in parts:
        if not np.isfinite(scale).all():
            raise FormatError(f"{where}: scale is not a finite number")
    return parts


def _from_float(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and per-row scales of float weights: read as ternary when every nonzero |w| is the same value
    (what BitNet converters write: W_q * s), else ternarized with the per-tensor absmean rule."""
    if not np.isfinite(w).all():
        raise ValueError("weights are not all finite")
    nonzero = np.abs(w[w != 0])
    if nonzero.size and nonzero.min() == nonzero.max():
        codes, scale = (np.sign(w) + 1).astype(np.uint8), float(nonzero[0])
    else:
        wq, scale = ternary.ternarize(w)
        codes = (wq + 1).astype(np.uint8)
    return codes, np.full(w.shape[0], scale, np.float32)


def block_scaled_parts(codes: np.ndarray, d: np.ndarray, block: int = ggml.QK_K) -> Parts:
    """Codes (out, in) with one scale per `block` columns, d (out, in // block), as parts with per-row scales.

    A block of zero weights (or scale 0) constrains nothing. When the other blocks of every row share one
    scale, that is the row's scale and there is one part (exact). Otherwise part j holds, in each row, the
    blocks with the row's j-th distinct scale (the rest zero): as many parts as a row has distinct scales.
    """
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // block, block)
    if (d < 0).any():  # (c - 1) * d == (1 - c) * -d
        blocks = np.where((d < 0)[:, :, None], 2 - blocks, blocks)
        d = np.abs(d)
    if not np.isfinite(d).all():
        raise ValueError("a block scale is not a finite number")
    blocks = np.where((d == 0)[:, :, None], 1, blocks).astype(np.uint8)
    used = (blocks != 1).any(axis=2)  # (rows, n_blocks)
    hi = np.where(used, d, -np.inf).max(axis=1)
    lo = np.where(used, d, np.inf).min(axis=1)
    any_used = used.any(axis=1)
    if np.all((hi == lo) | ~any_used):
        return [(blocks.reshape(rows, cols), np.where(any_used, hi, 0).astype(np.float32))]
    distinct = [np.unique(d[r][used[r]]) for r in range(rows)]
    rank = np.full(d.shape, -1)
    for r, vals in enumerate(distinct):
        rank[r, used[r]] = np.searchsorted(vals, d[r][used[r]])
    parts = []
    for j in range(max(len(v) for v in distinct)):
        part = np.where((rank == j)[:, :, None], blocks, 1).astype(np.uint8).reshape(rows, cols)
        scale = np.array([v[j] if j < len(v) else 0.0 for v in distinct], np.float32)
        parts.append((part, scale))
    return parts


def _linear(parts: Parts) -> TernaryLinear:
    layers = []
    for codes, scale in parts:
        uniform = scale.size and scale.min() == scale.max()
        layers.append(TernaryLinear.from_codes(np.ascontiguousarray(codes),
                                               float(scale[0]) if uniform else scale))
    return layers[0] if len(layers) == 1 else BlockScaledLinear(layers)


class BlockScaledLinear(TernaryLinear):
    """A ternary layer whose rows carry several scales: the exact sum of `n_parts` ternary layers of the
    same shape (each with per-row scales), stored stacked so that one kernel call computes all of them.

    Only TQ1_0/TQ2_0 files whose 256-column blocks disagree within a row need it (a BitNet model written
    by llama.cpp or bitnet.cpp has one scale per tensor); it costs n_parts times the work and memory.
    Activations are quantized once, as for any ternary layer. There is no single code matrix, so
    `codes()` raises: code that stores ternary layers must handle this class (or refuse it).
    """

    def __init__(self, parts: list[TernaryLinear]) -> None:
        stacked = TernaryLinear.concat(parts)
        super().__init__(stacked.packed, stacked.in_features, stacked.scale, stacked.layout)
        self.n_parts = len(parts)
        self.out_features = parts[0].out_features

    def part(self, j: int) -> TernaryLinear:
        """Part j as a plain layer (views, no copy)."""
        r0, r1 = j * self.out_features, (j + 1) * self.out_features
        return TernaryLinear(self.packed[r0:r1], self.in_features, self.scale[r0:r1], self.layout)

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        # x (m, in_features) -> (m, n_parts * out) from one kernel call -> (m, out)
        y = super().__call__(x, norm, eps)
        return y.reshape(len(x), self.n_parts, self.out_features).sum(axis=1)

    def codes(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        raise ShapeError("a block-scaled ternary layer has no single code matrix (its rows carry several scales)")

    def to_layout(self, layout: str) -> TernaryLinear:
        if layout == self.layout:
            return self
        return BlockScaledLinear([self.part(j).to_layout(layout) for j in range(self.n_parts)])


def concat(linears: list[TernaryLinear]) -> TernaryLinear:
    """TernaryLinear.concat that also stacks block-scaled layers (padding the others with zero-scale parts)."""
    if not any(isinstance(lin, BlockScaledLinear) for lin in linears):
        return TernaryLinear.concat(linears)
    n = max(getattr(lin, "n_parts", 1) for lin in linears)

    def parts(lin: TernaryLinear) -> list[TernaryLinear]:
        own = [lin.part(j) for j in range(lin.n_parts)] if isinstance(lin, BlockScaledLinear) else [lin]
        zero = TernaryLinear(own[0].packed, lin.in_features, np.zeros(lin.out_features, np.float32), lin.layout)
        return own + [zero] * (n - len(own))

    each = [parts(lin) for lin in linears]
    return BlockScaledLinear([TernaryLinear.concat([p[j] for p in each]) for j in range(n)])


# ---- the tokenizer --------------------------------------------------------------------------------

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's `tokenizer.ggml.pre` names -> the regexes that cut text before BPE (applied in turn, each
# cutting the pieces of the one before), and whether a piece that is a whole vocab entry skips the merges.
_LLAMA3_PRE = ((_LLAMA3,), True)
_SMOLLM_PRE = ((r"\p{N}", _GPT2), False)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon_e", "falcon-h1", "pixtral"),
                    _LLAMA3_PRE),
    **dict.fromkeys(("smaug-bpe", "dbrx"), ((_LLAMA3,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"), _SMOLLM_PRE),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), ((_GPT2,), False)),
    **dict.fromkeys(("qwen2", "stablelm2"), ((_QWEN2,), False)),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False),
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are matched whole in the text


def tokenizer_from_gguf(f: GGUFFile, arch_name: str = "") -> Tokenizer | None:
    """The tokenizer embedded in the file as a `tokenizers` byte-level BPE, or None (with a warning) when
    the file has none or one of a kind ternlm does not build (SentencePiece "llama", BERT, ...)."""
    model = _meta(f, "tokenizer.ggml.model", str)
    if model in (None, "no_vocab", "none"):  # a file for token ids only, as its writer meant
        return None
    if model != "gpt2":
        warnings.warn(f"{f.path}: tokenizer model {model!r} is not supported (only byte-level BPE, \"gpt2\"); "
                      "the model loads without a tokenizer", stacklevel=3)
        return None
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    merges = f.metadata.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not isinstance(merges, list):
        raise FormatError(f"{f.path}: a gpt2 tokenizer needs string arrays tokenizer.ggml.tokens and .merges")
    types = f.metadata.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.ones(len(tokens), np.int32)
    if not isinstance(types, np.ndarray) or types.shape != (len(tokens),):
        raise FormatError(f"{f.path}: tokenizer.ggml.token_type must be {len(tokens)} integers")

    pre = _meta(f, "tokenizer.ggml.pre", str)
    if pre is None:
        # Microsoft's 2B4T file has no `pre`; its vocabulary is Llama 3's, so is its pre-tokenizer.
        pre = "llama-bpe" if "<|begin_of_text|>" in tokens or arch_name.startswith("bitnet-") else "default"
    if pre not in PRE_TOKENIZERS:
        raise FormatError(f"{f.path}: pre-tokenizer {pre!r} is not supported; ternlm knows {sorted(PRE_TOKENIZERS)}")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # `tokenizers` refuses a merge whose parts or result are not tokens; llama.cpp never applies one
    # (writers use such a merge as a placeholder when a vocabulary has none), so it is left out.
    pairs = [p for p in (m.split(" ") for m in merges if isinstance(m, str))
             if len(p) == 2 and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": bool(types[i] == _CONTROL)}
             for i in np.flatnonzero((types == _CONTROL) | (types == _USER_DEFINED)).tolist()]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": pairs},
    }
    try:
        tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises plain Exception for every kind of bad input
        raise FormatError(f"{f.path}: the embedded tokenizer cannot be built ({e})") from e

    def token(key: str) -> str | None:
        i = _meta(f, f"tokenizer.ggml.{key}_token_id", int)
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise FormatError(f"{f.path}: tokenizer.ggml.{key}_token_id {i} is outside the {len(tokens)} tokens")
        return tokens[i]

    eos = [t for t in (token("eos"), token("eot"), token("eom")) if t is not None]
    bos = token("bos")
    add_bos = _meta(f, "tokenizer.ggml.add_bos_token", bool, ignore_merges and bos is not None)
    return Tokenizer(tok, bos_token=bos, eos_tokens=eos, add_bos_token=add_bos,
                     chat_template=_chat_template(f, arch_name, tokens))


def _chat_template(f: GGUFFile, arch_name: str, tokens: list[str]) -> str | None:
    """The file's template, except the broken one bitnet.cpp's converter writes (then 2B4T's trained one)."""
    template = _meta(f, "tokenizer.chat_template", str)
    has_eot = "<|eot_id|>" in tokens
    if template and BROKEN_BITNET_TEMPLATE_MARKER in template:
        return chat.BITNET_TEMPLATE if has_eot else None
    if template is None and arch_name in ("bitnet-b1.58", "bitnet-25") and has_eot:
        return chat.BITNET_TEMPLATE
    return template
