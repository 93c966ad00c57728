"""ternlm's own packed model file (.tlm), and the load cache built on it.

A .tlm file holds a model exactly as the engine runs it (ternary layers already in their i2/tq1 kernel
layout, the head already Q8_0/Q4_0/float), so loading maps the file and wraps views: no conversion and
no copy of the weights. Layout (all integers little-endian):

    0   magic       8 bytes  NATIVE_MAGIC
    8   version     u32      FORMAT_VERSION
    12  header_crc  u32      zlib.crc32 of the header bytes
    16  header_len  u64
    24  header      JSON (UTF-8): config, tokenizer, weight structure, tensor table
        padding to ALIGN
        data        tensors, each starting at a multiple of ALIGN; table offsets count from here

The header is small and checked in full on every load; tensor data carries a crc32 per tensor that
only `verify_native` (``ternlm verify``) recomputes, so loading stays independent of the file size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ternlm import ternary
from ternlm.config import ModelConfig
from ternlm.errors import FormatError, ShapeError, TernlmError
from ternlm.formats import LoadedModel, open_model
from ternlm.layers import LAYOUTS, FloatMatrix, Q4Matrix, Q8Matrix, TernaryLinear
from ternlm.model import LayerWeights, ModelWeights
from ternlm.paths import replacing
from ternlm.tokenizer import Tokenizer

log = logging.getLogger("ternlm.formats.native")

# The high byte and the newline catch files mangled by 7-bit or text-mode transfers, as PNG's signature does.
NATIVE_MAGIC = b"\x89TERNLM\n"
FORMAT_VERSION = 1
# Page-aligned tensors: each tensor owns its pages, so madvise/readahead/eviction work per tensor and a
# kernel streaming one matrix never faults in its neighbour's; the padding costs < 1 MB on a 2B model.
ALIGN = 4096
_PREFIX = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length
MAX_HEADER = 256 * 1024 * 1024  # a 128k-vocabulary tokenizer.json is about 10 MB
MAX_DIM = 1 << 40
# Tensor dtype names in the table; BF16 matrices are stored as their raw 16-bit words ("U16").
DTYPES: dict[str, np.dtype] = {"U8": np.dtype("u1"), "I8": np.dtype("i1"), "U16": np.dtype("<u2"),
                               "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
FLOAT_MATRIX_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "U16"}
_CRC_CHUNK = 64 * 1024 * 1024


# ---------------------------------------------------------------- writing


def write_native(model: LoadedModel, out: str | Path) -> Path:
    """Write `model` as a .tlm file at `out`, atomically (a temporary file, fsynced, then renamed)."""
    out = Path(out)
    tensors: list[tuple[str, np.ndarray]] = []
    structure = _describe_weights(model.weights, tensors)
    table, offset = {}, 0
    for name, arr in tensors:
        table[name] = {"dtype": _dtype_name(name, arr), "shape": list(arr.shape), "offset": offset,
                       "nbytes": arr.nbytes, "crc32": "00000000"}
        offset = _align(offset + arr.nbytes)
    header = {"config": _config_dict(model.config), "tokenizer": _tokenizer_dict(model.tokenizer),
              "weights": structure, "tensors": table, "info": _info(model.weights)}
    first = _header_bytes(header)
    data_start = _align(_PREFIX.size + len(first))

    with replacing(out) as tmp, open(tmp, "xb") as f:
        f.write(_PREFIX.pack(NATIVE_MAGIC, FORMAT_VERSION, 0, len(first)) + first)
        for name, arr in tensors:
            f.seek(data_start + table[name]["offset"])
            data = memoryview(arr).cast("B") if arr.nbytes else b""
            f.write(data)
            table[name]["crc32"] = f"{zlib.crc32(data):08x}"
        f.truncate(data_start + offset)
        final = _header_bytes(header)
        if len(final) != len(first):  # only the fixed-width checksums changed
            raise TernlmError(f"{out}: header changed length while writing ({len(first)} -> {len(final)})")
        f.seek(0)
        f.write(_PREFIX.pack(NATIVE_MAGIC, FORMAT_VERSION, zlib.crc32(final), len(final)) + final)
        f.flush()
        os.fsync(f.fileno())
        _drop_cached_pages(f.fileno())
    return out


def _drop_cached_pages(fd: int) -> None:
    """Evict a just-written file from the page cache: written pages sit there in 4 KiB pieces, which any
    mapping of them keeps; read back by load_native they come in as huge pages (see _huge_pages)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# Linux madvise advice that Python 3.11's mmap module does not name.
_MADV_PAGEOUT = 21  # Linux 5.4: reclaim the range (clean file pages leave the page cache)
_MADV_POPULATE_READ = 22  # Linux 5.14: fault the whole range in now


def _huge_pages(path: Path, mm: mmap.mmap) -> mmap.mmap:
    """The file mapped in whole, on 2 MiB pages as far as the kernel and filesystem allow.

    Decode streams weights on 4 KiB pages 10-15 % slower (TLB misses, and the hardware prefetchers stop at
    every 4 KiB boundary). The page cache keeps a file in the page size it was read or written in, and a
    mapping takes that size; so when memory pressure has left part of the file in 4 KiB pieces while the
    rest proves huge pages work here, those pages are handed back once and the file is mapped again.
    """
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE") or len(mm) > _available_memory() // 2:
        return mm
    try:
        mm.madvise(_MADV_POPULATE_READ)
        resident, huge = _mapped_pages(mm)
        if huge and resident - huge > resident // 10:
            mm.madvise(_MADV_PAGEOUT)
            mm.close()
            mm, _, _ = _open(path)
            mm.madvise(_MADV_POPULATE_READ)
    except OSError:  # an older kernel without the advice: pages fault in as decode reads them
        pass
    return mm


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _mapped_pages(mm: mmap.mmap) -> tuple[int, int]:
    """(resident bytes, bytes on 2 MiB pages) of the mapping, from /proc/self/smaps."""
    start = np.frombuffer(mm, np.uint8, 1).ctypes.data
    text = Path("/proc/self/smaps").read_text()
    at = text.find(f"{start:x}-")
    if at < 0 or (at > 0 and text[at - 1] != "\n"):
        return 0, 0
    block = text[at:text.find("VmFlags:", at)]
    field = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in block.splitlines()[1:])}
    return field.get("Rss", 0), field.get("FilePmdMapped", 0)


def _describe_weights(w: ModelWeights, tensors: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """The JSON structure of `w`, appending each array it names to `tensors`."""

    def add(name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        tensors.append((name, arr))
        return name

    def vector(name: str, v: np.ndarray | None) -> str | None:
        return None if v is None else add(name, np.asarray(v, np.float32))

    def matrix(name: str, m: FloatMatrix | Q8Matrix | Q4Matrix) -> dict[str, Any]:
        if isinstance(m, FloatMatrix):
            return {"type": m.dtype, "weight": add(name + ".weight", m.weight)}
        if isinstance(m, Q8Matrix):
            return {"type": "Q8_0", "q": add(name + ".q", m.q), "d": add(name + ".d", m.d)}
        if isinstance(m, Q4Matrix):
            return {"type": "Q4_0", "q4": add(name + ".q4", m.q4), "d": add(name + ".d", m.d)}
        raise FormatError(f"{name}: cannot store a {type(m).__name__} in a ternlm file")

    def linear(name: str, lin: TernaryLinear) -> dict[str, Any]:
        if type(lin) is not TernaryLinear:  # e.g. a GGUF layer with a scale per 256-block: no packed form here
            raise FormatError(f"{name}: cannot store a {type(lin).__name__} in a ternlm file")
        scale = lin.scale if isinstance(lin.scale, float) else add(name + ".scale", lin.scale)
        return {"layout": lin.layout, "in_features": lin.in_features, "packed": add(name + ".packed", lin.packed),
                "scale": scale}

    embed = matrix("embed", w.embed)
    head = "embed" if w.head is w.embed else matrix("head", w.head)
    layers = []
    for i, lw in enumerate(w.layers):
        p = f"layers.{i}."
        layers.append({
            "attn_norm": vector(p + "attn_norm", lw.attn_norm), "ffn_norm": vector(p + "ffn_norm", lw.ffn_norm),
            "attn_sub_norm": vector(p + "attn_sub_norm", lw.attn_sub_norm),
            "ffn_sub_norm": vector(p + "ffn_sub_norm", lw.ffn_sub_norm),
            **{key: linear(p + key, getattr(lw, key)) for key in ("qkv", "o", "gate_up", "down")},
        })
    return {"embed": embed, "head": head, "norm": vector("norm", w.norm), "layers": layers}


def _dtype_name(name: str, arr: np.ndarray) -> str:
    for key, dt in DTYPES.items():
        if arr.dtype == dt:
            return key
    raise FormatError(f"{name}: dtype {arr.dtype} cannot be stored in a ternlm file")


def _config_dict(config: ModelConfig) -> dict[str, Any]:
    raw = dataclasses.asdict(config)
    raw["eos_ids"] = list(raw["eos_ids"])
    return raw


def _tokenizer_dict(tok: Tokenizer | None) -> dict[str, Any] | None:
    if tok is None:
        return None
    return {"json": tok.to_json(), "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "add_bos_token": bool(tok.add_bos_token), "chat_template": tok.chat_template,
            "eos_ids": sorted(int(i) for i in tok.eos_ids)}


def _info(w: ModelWeights) -> dict[str, str]:
    """What load options the file was written with, for `ternlm info` and people reading the header."""
    from ternlm import __version__

    head = {"Q8_0": "q8_0", "Q4_0": "q4_0"}.get(w.head.dtype, "float")
    layouts = sorted({lin.layout for lw in w.layers for lin in lw.linears()})
    return {"head": head, "weights": "+".join(layouts), "writer": f"ternlm {__version__}"}


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ---------------------------------------------------------------- reading


def is_native(path: str | Path) -> bool:
    """Whether `path` is a file that starts with NATIVE_MAGIC."""
    try:
        with open(path, "rb") as f:
            return f.read(len(NATIVE_MAGIC)) == NATIVE_MAGIC
    except OSError:
        return False


def load_native(path: str | Path) -> LoadedModel:
    """Map a .tlm file read-only: every weight array is a view into the mapping (no copy, no conversion).

    Any inconsistency of the header with itself or with the file raises FormatError naming the file;
    tensor checksums are not recomputed here (see verify_native).
    """
    path = Path(path)
    mm, header, data_start = _open(path)
    mm = _huge_pages(path, mm)
    views = _tensor_views(path, mm, header, data_start)
    config = _read_config(path, header.get("config"))
    weights = _Weights(path, views, config).build(header.get("weights"))
    tokenizer = _read_tokenizer(path, header.get("tokenizer"))
    return LoadedModel(config, weights, tokenizer)


def verify_native(path: str | Path) -> list[str]:
    """Problems found in a .tlm file: its structure, then every tensor's crc32. Empty when the file is intact."""
    path = Path(path)
    try:
        mm, header, data_start = _open(path)
        _tensor_views(path, mm, header, data_start)
    except FormatError as e:
        return [str(e)]
    problems = []
    with memoryview(mm) as whole:
        for name, entry in header["tensors"].items():
            start, end = data_start + entry["offset"], data_start + entry["offset"] + entry["nbytes"]
            crc = 0
            for pos in range(start, end, _CRC_CHUNK):
                with whole[pos:min(pos + _CRC_CHUNK, end)] as chunk:
                    crc = zlib.crc32(chunk, crc)
            if f"{crc:08x}" != entry["crc32"]:
                problems.append(f"{path}: tensor {name!r}: data checksum {crc:08x} does not match the header's "
                                f"{entry['crc32']} (the file is corrupt)")
    try:
        load_native(path)
    except FormatError as e:
        problems.append(str(e))
    return problems


def _open(path: Path) -> tuple[mmap.mmap, dict[str, Any], int]:
    """Map the file and return (mapping, checked header, absolute offset of the data section)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _PREFIX.size:
                raise FormatError(f"{path}: {size} bytes is too short for a ternlm file (truncated?)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e}") from e
    with contextlib.suppress(AttributeError, OSError):  # a kernel without transparent huge pages: 4 KiB pages
        mm.madvise(mmap.MADV_HUGEPAGE)  # see _huge_pages
    magic, version, header_crc, header_len = _PREFIX.unpack_from(mm, 0)
    if magic != NATIVE_MAGIC:
        raise FormatError(f"{path}: not a ternlm file (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: ternlm file format version {version}; this ternlm reads version {FORMAT_VERSION}")
    if header_len > MAX_HEADER:
        raise FormatError(f"{path}: header length {header_len} exceeds the limit of {MAX_HEADER}")
    if header_len > size - _PREFIX.size:
        raise FormatError(f"{path}: header length {header_len} runs past the end of the {size}-byte file (truncated?)")
    raw = mm[_PREFIX.size:_PREFIX.size + header_len]
    if zlib.crc32(raw) != header_crc:
        raise FormatError(f"{path}: header checksum mismatch (the header is corrupt)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    if not isinstance(header.get("tensors"), dict):
        raise FormatError(f"{path}: header has no tensor table")
    return mm, header, _align(_PREFIX.size + header_len)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_views(path: Path, mm: mmap.mmap, header: dict[str, Any], data_start: int) -> dict[str, np.ndarray]:
    """Read-only arrays over the mapping, one per table entry, after checking each entry against the file."""
    size = len(mm)
    views, spans = {}, []
    for name, e in header["tensors"].items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise FormatError(f"{where}: table entry is not an object")
        dtype, shape, offset, nbytes = e.get("dtype"), e.get("shape"), e.get("offset"), e.get("nbytes")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{where}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
            raise FormatError(f"{where}: bad shape {shape!r}")
        if not _is_int(offset) or not _is_int(nbytes) or offset < 0 or nbytes < 0:
            raise FormatError(f"{where}: bad offset {offset!r} or size {nbytes!r}")
        if offset % ALIGN:
            raise FormatError(f"{where}: offset {offset} is not a multiple of {ALIGN}")
        if data_start + offset + nbytes > size:
            raise FormatError(f"{where}: bytes {data_start + offset}..{data_start + offset + nbytes} lie beyond "
                              f"the end of the {size}-byte file (truncated?)")
        if math.prod(shape) * DTYPES[dtype].itemsize != nbytes:
            raise FormatError(f"{where}: {nbytes} bytes do not hold a {dtype} tensor of shape {shape}")
        if not (isinstance(e.get("crc32"), str) and len(e["crc32"]) == 8):
            raise FormatError(f"{where}: bad checksum field {e.get('crc32')!r}")
        spans.append((offset, offset + nbytes, name))
        if nbytes:
            views[name] = np.frombuffer(mm, DTYPES[dtype], math.prod(shape), data_start + offset).reshape(shape)
        else:
            views[name] = np.empty(shape, DTYPES[dtype])
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise FormatError(f"{path}: tensors {a!r} and {b!r} overlap")
    return views


def _read_config(path: Path, raw: Any) -> ModelConfig:
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: header has no config object")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise FormatError(f"{path}: config has unknown fields {unknown} (written by a newer ternlm?)")
    kwargs = {}
    for name, value in raw.items():
        kind = fields[name].type
        ok = {"int": _is_int(value), "float": _is_int(value) or isinstance(value, float),
              "str": isinstance(value, str), "bool": isinstance(value, bool),
              "int | None": value is None or _is_int(value),
              "tuple[int, ...]": isinstance(value, list) and all(_is_int(v) for v in value)}.get(kind, True)
        if not ok:
            raise FormatError(f"{path}: config field {name!r} is {value!r}, expected {kind}")
        kwargs[name] = tuple(value) if kind == "tuple[int, ...]" else float(value) if kind == "float" else value
    try:
        return ModelConfig(**kwargs)
    except FormatError as e:
        raise FormatError(f"{path}: config: {e}") from e
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: config: {e}") from e


class _Weights:
    """Builds ModelWeights from the header's structure, checking every array against the config's shapes."""

    def __init__(self, path: Path, views: dict[str, np.ndarray], config: ModelConfig) -> None:
        self.path, self.views, self.c = path, views, config

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    def tensor(self, name: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if not isinstance(name, str) or name not in self.views:
            raise self.fail(f"missing tensor {name!r}")
        arr = self.views[name]
        if arr.dtype != DTYPES[dtype] or arr.shape != shape:
            raise self.fail(f"tensor {name!r} is {arr.dtype} {list(arr.shape)}, expected {DTYPES[dtype]} {list(shape)}")
        return arr

    def spec(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what}: expected an object, got {value!r:.80}")
        return value

    def matrix(self, value: Any, what: str) -> FloatMatrix | Q8Matrix | Q4Matrix:
        s = self.spec(value, what)
        rows, cols = self.c.vocab_size, self.c.dim
        kind = s.get("type")
        if isinstance(kind, str) and kind in FLOAT_MATRIX_DTYPES:
            return FloatMatrix(self.tensor(s.get("weight"), FLOAT_MATRIX_DTYPES[kind], (rows, cols)), kind)
        if kind in ("Q8_0", "Q4_0") and cols % 32 == 0:
            d = self.tensor(s.get("d"), "F16", (rows, cols // 32))
            if kind == "Q8_0":
                return Q8Matrix(self.tensor(s.get("q"), "I8", (rows, cols)), d)
            return Q4Matrix(self.tensor(s.get("q4"), "U8", (rows, cols // 2)), d)
        raise self.fail(f"{what}: unknown matrix type {kind!r} for width {cols}")

    def vector(self, name: Any, n: int, optional: bool = False) -> np.ndarray | None:
        if name is None and optional:
            return None
        return self.tensor(name, "F32", (n,))

    def linear(self, value: Any, what: str, out_features: int, in_features: int) -> TernaryLinear:
        s = self.spec(value, what)
        layout, scale = s.get("layout"), s.get("scale")
        if not isinstance(layout, str) or layout not in LAYOUTS or s.get("in_features") != in_features:
            raise self.fail(f"{what}: layout {layout!r} with {s.get('in_features')!r} inputs, expected one of "
                            f"{LAYOUTS} with {in_features}")
        k_pad = ternary.padded_k(in_features) if layout == "i2" else ternary.padded_k_tq1(in_features)
        packed = self.tensor(s.get("packed"), "U8", (out_features, k_pad // (4 if layout == "i2" else 5)))
        if isinstance(scale, str):
            scale = self.tensor(scale, "F32", (out_features,))
        elif _is_int(scale) or isinstance(scale, float):
            scale = float(scale)
        else:
            raise self.fail(f"{what}: bad scale {scale!r:.80}")
        try:
            return TernaryLinear(packed, in_features, scale, layout)
        except ShapeError as e:
            raise self.fail(f"{what}: {e}") from e

    def build(self, value: Any) -> ModelWeights:
        s, shapes = self.spec(value, "weights"), self.linear_shapes()
        layers_raw = s.get("layers")
        if not isinstance(layers_raw, list) or len(layers_raw) != self.c.n_layers:
            raise self.fail(f"weights: expected a list of {self.c.n_layers} layers")
        layers = []
        for i, raw in enumerate(layers_raw):
            lw = self.spec(raw, f"layer {i}")
            layers.append(LayerWeights(
                attn_norm=self.vector(lw.get("attn_norm"), self.c.dim),
                ffn_norm=self.vector(lw.get("ffn_norm"), self.c.dim),
                attn_sub_norm=self.vector(lw.get("attn_sub_norm"), self.c.q_dim, optional=True),
                ffn_sub_norm=self.vector(lw.get("ffn_sub_norm"), self.c.ffn_dim, optional=True),
                **{key: self.linear(lw.get(key), f"layer {i} {key}", *shape) for key, shape in shapes.items()},
            ))
        embed = self.matrix(s.get("embed"), "embed")
        head = embed if s.get("head") == "embed" else self.matrix(s.get("head"), "head")
        return ModelWeights(embed=embed, norm=self.vector(s.get("norm"), self.c.dim), head=head, layers=layers)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        c = self.c
        return {"qkv": (c.q_dim + 2 * c.kv_dim, c.dim), "o": (c.dim, c.q_dim), "gate_up": (2 * c.ffn_dim, c.dim),
                "down": (c.dim, c.ffn_dim)}


def _read_tokenizer(path: Path, raw: Any) -> Tokenizer | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("json"), str):
        raise FormatError(f"{path}: tokenizer entry must be an object holding tokenizer.json text")
    bos, eos, template = raw.get("bos_token"), raw.get("eos_token"), raw.get("chat_template")
    add_bos, eos_ids = raw.get("add_bos_token"), raw.get("eos_ids")
    if (not all(v is None or isinstance(v, str) for v in (bos, eos, template)) or not isinstance(add_bos, bool)
            or not isinstance(eos_ids, list) or not all(_is_int(i) for i in eos_ids)):
        raise FormatError(f"{path}: tokenizer entry has fields of the wrong type")
    try:
        tok = tokenizers.Tokenizer.from_str(raw["json"])
    except Exception as e:  # the Rust side raises plain Exception for every kind of bad input
        raise FormatError(f"{path}: the stored tokenizer cannot be read ({e})") from e
    return Tokenizer(tok, bos_token=bos, eos_tokens=[eos] if eos else [], add_bos_token=add_bos,
                     chat_template=template, extra_eos_ids=eos_ids)


# ---------------------------------------------------------------- load cache


def prepare(loaded: LoadedModel, head: str, weights: str) -> LoadedModel:
    """Apply the load options: quantize the head (unless "float") and repack the ternary layers (unless "i2")."""
    if head != "float":
        loaded.weights.quantize_head(head)
    if weights != "i2":
        loaded.weights.convert_ternary(weights)
    return loaded


def convert_native(src: str | Path, out: str | Path, head: str = "q8_0", weights: str = "i2") -> Path:
    """`ternlm convert`: read any supported source, apply the load options, write a .tlm file at `out`."""
    src = Path(src)
    return write_native(prepare(load_native(src) if is_native(src) else open_model(src), head, weights), out)


def cache_enabled(cache: bool = True) -> bool:
    """Caching is on unless the caller turned it off or TERNLM_NO_CACHE is set to a true value."""
    return cache and os.environ.get("TERNLM_NO_CACHE", "").strip().lower() in ("", "0", "false", "no")


def load_cached(path: str | Path, head: str, weights: str, cache: bool = True) -> LoadedModel:
    """The model at `path` with load options applied, through the cache when `path` is an HF directory
    or a GGUF file: a hit maps $TERNLM_HOME/cache/<key>.tlm; a miss reads the source and writes the cache
    file (a failure to write only logs a warning). A corrupt cache file is deleted and the source read."""
    path = Path(path)
    if is_native(path):
        return prepare(load_native(path), head, weights)
    if not (cache_enabled(cache) and _cacheable(path)):
        return prepare(open_model(path), head, weights)
    try:
        file = cache_file(path, head, weights)
    except OSError as e:
        log.warning("model cache disabled for %s: %s", path, e)
        return prepare(open_model(path), head, weights)
    if file.is_file():
        try:
            loaded = load_native(file)
            log.debug("loaded %s from the cache file %s", path, file)
            return loaded
        except FormatError as e:
            log.warning("deleting corrupt model cache file: %s", e)
            file.unlink(missing_ok=True)
    loaded = prepare(open_model(path), head, weights)
    try:
        write_native(loaded, file)
        for stale in file.parent.glob(file.name.rsplit("-", 1)[0] + "-*.tlm"):
            if stale != file:  # an earlier state of the same source with the same options
                stale.unlink(missing_ok=True)
    except (OSError, TernlmError) as e:
        log.warning("could not write the model cache file %s: %s", file, e)
    return loaded


def _cacheable(path: Path) -> bool:
    if path.is_dir():
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def cache_file(source: Path, head: str, weights: str) -> Path:
    """$TERNLM_HOME/cache/<source>-<head>-<weights>-<state>.tlm, <state> hashing each source file's size,
    mtime_ns and first and last 4 KiB (changed headers are caught even within one mtime tick), the
    format version and ternlm's version."""
    from ternlm import __version__
    from ternlm.paths import home

    source = source.resolve()
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    # TERNLM_I2S_BLOCK changes how an I2_S GGUF decodes, so it is part of what the cache holds
    state = hashlib.sha256(f"{FORMAT_VERSION}|{__version__}|{head}|{weights}|"
                           f"{os.environ.get('TERNLM_I2S_BLOCK', '')}".encode())
    for file in files:
        st = file.stat()
        state.update(f"|{file.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(file, "rb") as f:
            state.update(f.read(4096))
            if st.st_size > 4096:
                f.seek(max(4096, st.st_size - 4096))
                state.update(f.read(4096))
    where = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return home() / "cache" / f"{where}-{head}-{weights}-{state.hexdigest()[:24]}.tlm"
