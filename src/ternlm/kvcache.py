"""A preallocated key/value cache for one sequence."""

from __future__ import annotations

import numpy as np

from ternlm.config import ModelConfig


class KVCache:
    """Keys and values of every layer for positions 0..max_len-1, allocated once.

    numpy's zeros are backed by untouched pages, so a 4096-position cache costs memory only as it fills.
    """

    def __init__(self, config: ModelConfig, max_len: int) -> None:
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # (layers, kv_heads, max_len, head_dim)
        self.v = np.zeros(shape, dtype=np.float32)
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
