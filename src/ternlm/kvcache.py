"""A preallocated key/value cache for one sequence."""

from __future__ import annotations

import mmap

import numpy as np

from ternlm.config import ModelConfig


class KVCache:
    """Keys and values of every layer for positions 0..max_len-1, allocated once.

    The memory is anonymous pages that cost nothing until written, so a 4096-position cache costs memory
    only as it fills. Transparent huge pages are refused for it: with them, writing position 0 of each
    (layer, kv head) makes the kernel zero a whole 2 MB page, about 600 MB and 0.75 s for the first token
    of a 2B4T-shaped model at 4096 positions (4 KB pages: under 1 ms).
    """

    def __init__(self, config: ModelConfig, max_len: int) -> None:
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = _lazy_zeros(shape)  # (layers, kv_heads, max_len, head_dim) float32
        self.v = _lazy_zeros(shape)
        self.scores = np.empty((config.n_heads, max_len), dtype=np.float32)  # decode attention scratch
        self.max_len = max_len

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v (kv_heads, t, head_dim) at positions start.., return all keys/values up to them."""
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """Zeroed float32 array on anonymous memory without transparent huge pages, where the OS allows."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype=np.float32)
    # Private: a process forked from this one gets its own copy on write, not the same pages.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=np.float32).reshape(shape)
