"""Read a .safetensors file as memory-mapped numpy arrays, checking every header field first.

The `safetensors` package's numpy backend cannot represent bfloat16 (the dtype of every published
BitNet checkpoint) and copies tensors into memory; this reader maps the file once and returns views,
with bfloat16 as raw uint16 words.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ternlm.errors import FormatError

# safetensors dtype name -> numpy dtype; BF16 is kept as its raw 16-bit pattern.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint: a read-only view into the mapped file."""

    name: str
    dtype: str  # the safetensors name: "BF16", "F32", "U8", ...
    data: np.ndarray
    file: Path
    offset: int = 0  # of the data in the file

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def release(self) -> None:
        """Drop this tensor's pages from the process once it has been converted into another array.

        The mapping stays alive while any tensor of the file is in use (an F16 embedding, say), and
        pages read during conversion would otherwise count as resident memory a second time.
        """
        mm = getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = -(-self.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (self.offset + self.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Map `path` and return its tensors by name; any inconsistency raises FormatError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{path}: file is {size} bytes, too short to be safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER, size - 8):
                raise FormatError(f"{path}: header length {header_len} exceeds the file size {size}")
            header_bytes = f.read(header_len)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")

    data_start = 8 + header_len
    data_size = size - data_start
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if data_size > 0 else np.zeros(0, np.uint8)
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(path, name, info, mapped, data_start, data_size)
    return tensors


def _tensor(path: Path, name: str, info: object, mapped: np.ndarray, start: int, data_size: int) -> Tensor:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise FormatError(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise FormatError(f"{where}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise FormatError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    np_dtype = DTYPES[dtype]
    nbytes = math.prod(shape) * np_dtype.itemsize
    if not 0 <= begin <= end <= data_size:
        raise FormatError(f"{where}: data [{begin}, {end}) lies outside the {data_size}-byte data section "
                          "(truncated file?)")
    if end - begin != nbytes:
        raise FormatError(f"{where}: {end - begin} bytes of data for shape {shape} of {dtype} ({nbytes} bytes)")
    raw = mapped[start + begin:start + end]
    return Tensor(name, dtype, raw.view(np_dtype).reshape(shape), path, start + begin)
