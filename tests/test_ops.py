"""The fused float ops in C (RMSNorm, gated activation, decode attention) against their numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm import kernels, ternary
from ternlm.errors import ShapeError


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_rmsnorm(m: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100)
    w = rng.standard_normal(k).astype(np.float32)
    # the mean of squares is summed in another order than numpy's pairwise sum: a few ulps apart
    np.testing.assert_allclose(kernels.rmsnorm(x, w, 1e-5), ternary.rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_glu(act: str) -> None:
    rng = np.random.default_rng(0)
    gu = rng.standard_normal((3, 2 * 77)).astype(np.float32) * 10
    gu[0, :5] = [-200.0, 200.0, 0.0, -0.0, 1e-30]  # silu must not overflow on large negative gates
    np.testing.assert_allclose(kernels.glu(gu, act), ternary.glu(gu, act), rtol=1e-6, atol=1e-30)


def test_glu_rejects_bad_input() -> None:
    with pytest.raises(ShapeError):
        kernels.glu(np.zeros((2, 5), np.float32), "relu2")
    with pytest.raises(ShapeError):
        kernels.glu(np.zeros((2, 4), np.float32), "gelu")


@settings(max_examples=30, deadline=None)
@given(n_kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 3, 4]), hd=st.sampled_from([2, 16, 64, 128]),
       pos=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_attention_decode(n_kv: int, group: int, hd: int, pos: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_heads, max_len = n_kv * group, 48
    qkv = rng.standard_normal((n_heads + 2 * n_kv) * hd).astype(np.float32)
    k_cache = rng.standard_normal((n_kv, max_len, hd)).astype(np.float32)
    v_cache = rng.standard_normal((n_kv, max_len, hd)).astype(np.float32)
    angles = rng.uniform(0, 6.3, hd // 2).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    k_ref, v_ref = k_cache.copy(), v_cache.copy()
    expected = ternary.attention_decode(qkv, k_ref, v_ref, pos, cos, sin, n_heads, hd ** -0.5)
    got = kernels.attention_decode(qkv, k_cache, v_cache, pos, cos, sin, n_heads, hd ** -0.5,
                                   np.empty((n_heads, max_len), np.float32))
    np.testing.assert_array_equal(k_cache, k_ref)  # RoPE'd key and value written at pos, nothing else
    np.testing.assert_array_equal(v_cache, v_ref)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_attention_decode_checks_position() -> None:
    caches = [np.zeros((1, 4, 8), np.float32) for _ in range(2)]
    trig = np.ones(4, np.float32)
    with pytest.raises(ShapeError, match="position"):
        kernels.attention_decode(np.zeros(24, np.float32), *caches, 4, trig, trig, 1, 1.0, np.zeros((1, 4), np.float32))
    with pytest.raises(ShapeError):  # qkv one element short
        kernels.attention_decode(np.zeros(23, np.float32), *caches, 0, trig, trig, 1, 1.0, np.zeros((1, 4), np.float32))
