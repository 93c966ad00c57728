"""The KV cache costs memory only for the positions written, huge pages or not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ternlm.config import ModelConfig
from ternlm.kvcache import KVCache


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the RSS")
def test_first_token_touches_only_its_pages() -> None:
    # 2B4T's cache shape at 4096 positions: 2 x 300 MB, of which one token needs 2 x 30 layers x 5 heads x 512 B.
    config = ModelConfig(arch="bitnet", dim=2560, n_layers=30, n_heads=20, n_kv_heads=5, ffn_dim=6912,
                         vocab_size=128256, head_dim=128, max_seq_len=4096)
    before = _rss()
    cache = KVCache(config, 4096)
    kv = np.ones((5, 1, 128), np.float32)
    for layer in range(30):
        cache.store(layer, 0, kv, kv)
    grown = _rss() - before
    assert grown < 16 << 20, f"writing one position grew RSS by {grown >> 20} MB"
    assert cache.k[29, 4, 0, 0] == 1.0 and cache.k[29, 4, 1, 0] == 0.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_writes_its_own_copy() -> None:
    # A server worker forked after a cache was made must not write into its parent's keys and values.
    config = ModelConfig(arch="bitnet", dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=16,
                         head_dim=32, max_seq_len=8)
    cache = KVCache(config, 8)
    cache.k[0, 0, 0, 0] = 1.0
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's cleanup
        cache.k[0, 0, 0, 0] = 2.0
        cache.v[0, 0, 1, 0] = 3.0
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.k[0, 0, 0, 0] == 1.0 and cache.v[0, 0, 1, 0] == 0.0
