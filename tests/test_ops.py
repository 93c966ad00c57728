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


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), period=st.integers(1, 70), first=st.integers(1, 300), extra=st.integers(0, 40),
       seed=st.integers(0, 2**32 - 1))
def test_causal_softmax(heads: int, period: int, first: int, extra: int, seed: int) -> None:
    """Prefill's causal softmax against numpy, rows stacked per head as attention_prefill stacks them; some
    rows see every key (s shorter than their reach), the others end in zeros."""
    rng = np.random.default_rng(seed)
    s = max(1, first + period - 1 - extra)
    x = (rng.standard_normal((heads * period, s)) * rng.uniform(0.1, 30)).astype(np.float32)
    want = ternary.causal_softmax(x, period, first, 0.088)
    got = kernels.causal_softmax(x.copy(), period, first, 0.088)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)  # exp within 2 ulp of numpy's
    reach = np.minimum(first + np.arange(heads * period) % period, s)
    assert all(not got[r, n:].any() for r, n in enumerate(reach))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_causal_softmax_rejects_bad_input() -> None:
    with pytest.raises(ShapeError):
        kernels.causal_softmax(np.zeros((2, 5), np.float32), 0, 1, 1.0)
    with pytest.raises(ShapeError):
        kernels.causal_softmax(np.zeros((2, 5), np.float64), 2, 1, 1.0)
    with pytest.raises(ShapeError, match="C-contiguous"):
        kernels.causal_softmax(np.zeros((2, 10), np.float32)[:, ::2], 2, 1, 1.0)


@settings(max_examples=30, deadline=None)
@given(n_kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 3, 4]), hd=st.sampled_from([2, 16, 64, 128]),
       pos=st.one_of(st.integers(0, 70), st.integers(0, 300)), seed=st.integers(0, 2**32 - 1))
def test_attention_decode(n_kv: int, group: int, hd: int, pos: int, seed: int) -> None:
    """Against numpy, for contexts of one and of several 64-position chunks."""
    rng = np.random.default_rng(seed)
    n_heads, max_len = n_kv * group, 320
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


def _batch_case(rng: np.random.Generator, b: int, n_kv: int, group: int, hd: int, same_len: bool):
    n_heads = n_kv * group
    lens = [150] * b if same_len else [int(x) for x in rng.integers(1, 150, b)]
    positions = [int(rng.integers(0, n)) for n in lens]
    qkv = rng.standard_normal((b, (n_heads + 2 * n_kv) * hd)).astype(np.float32)
    ks = [rng.standard_normal((n_kv, n, hd)).astype(np.float32) for n in lens]
    vs = [rng.standard_normal((n_kv, n, hd)).astype(np.float32) for n in lens]
    scores = [np.empty((n_heads, n), np.float32) for n in lens]
    angles = rng.uniform(0, 6.3, (150, hd // 2)).astype(np.float32)
    return n_heads, positions, qkv, ks, vs, scores, np.cos(angles), np.sin(angles)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 9), n_kv=st.sampled_from([1, 2, 5]), group=st.sampled_from([1, 3, 4]),
       hd=st.sampled_from([2, 16, 128]), threads=st.integers(1, 3), same_len=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_attention_decode_batch_matches_per_sequence(b: int, n_kv: int, group: int, hd: int, threads: int,
                                                      same_len: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_heads, positions, qkv, ks, vs, scores, cos, sin = _batch_case(rng, b, n_kv, group, hd, same_len)
    ks_ref, vs_ref = [k.copy() for k in ks], [v.copy() for v in vs]
    before = kernels.get_threads()
    try:
        kernels.set_threads(threads)
        expected = np.stack([kernels.attention_decode(qkv[j], ks_ref[j], vs_ref[j], p, cos[p], sin[p], n_heads,
                                                      hd ** -0.5, np.empty_like(scores[j]))
                             for j, p in enumerate(positions)])
        got = kernels.attention_decode_batch(qkv, ks, vs, positions, cos, sin, n_heads, hd ** -0.5, scores)
    finally:
        kernels.set_threads(before)
    np.testing.assert_array_equal(got, expected)
    for j in range(b):
        np.testing.assert_array_equal(ks[j], ks_ref[j])
        np.testing.assert_array_equal(vs[j], vs_ref[j])


def test_attention_decode_bits_do_not_depend_on_threads() -> None:
    """The work is split into fixed chunks of positions, merged in order: any thread count, the same bits."""
    rng = np.random.default_rng(7)
    n_heads, positions, qkv, ks, vs, scores, cos, sin = _batch_case(rng, 3, 5, 4, 128, False)
    before = kernels.get_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            kernels.set_threads(threads)
            results.append(kernels.attention_decode_batch(qkv, [k.copy() for k in ks], [v.copy() for v in vs],
                                                          positions, cos, sin, n_heads, 128 ** -0.5, scores))
    finally:
        kernels.set_threads(before)
    for got in results[1:]:
        np.testing.assert_array_equal(got.view(np.uint32), results[0].view(np.uint32))


def test_attention_decode_batch_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    n_heads, positions, qkv, ks, vs, scores, cos, sin = _batch_case(rng, 3, 2, 2, 16, True)

    def call(**kw: object) -> np.ndarray:
        a = dict(qkv=qkv, k_caches=ks, v_caches=vs, positions=positions, cos=cos, sin=sin, n_heads=n_heads,
                 scale=0.25, scores=scores)
        a.update(kw)
        return kernels.attention_decode_batch(**a)

    call()  # the good case works
    with pytest.raises(ShapeError, match="as many"):
        call(positions=positions[:2])
    with pytest.raises(ShapeError, match="as many"):
        call(qkv=qkv[:2])
    with pytest.raises(ShapeError):
        call(positions=[0, 150, 0])  # past max_len
    with pytest.raises(ShapeError):
        call(positions=[0, -1, 0])
    with pytest.raises(ShapeError):
        call(positions=[0, "1", 0])
    with pytest.raises(ShapeError):  # a cache of another max_len is fine, a position past it is not
        call(k_caches=[ks[0], ks[1][:, :8].copy(), ks[2]], v_caches=[vs[0], vs[1][:, :8].copy(), vs[2]],
             scores=[scores[0], scores[1][:, :8].copy(), scores[2]], positions=[0, 8, 0])
    with pytest.raises(ShapeError):  # scores of the wrong max_len
        call(scores=[scores[0], scores[1][:, :8].copy(), scores[2]])
    with pytest.raises(ShapeError):
        call(k_caches=[ks[0], ks[1].astype(np.float64), ks[2]], v_caches=[vs[0], vs[1].astype(np.float64), vs[2]])
    with pytest.raises(ShapeError):
        call(qkv=qkv.astype(np.float64))
    with pytest.raises(ShapeError):
        call(cos=cos.astype(np.float64))
    with pytest.raises(ShapeError):  # RoPE tables too short for a position
        call(cos=cos[:2].copy(), sin=sin[:2].copy(), positions=[0, 5, 0])
    with pytest.raises(ShapeError):  # not contiguous
        call(qkv=np.asfortranarray(qkv))
    with pytest.raises(ShapeError):  # not contiguous
        call(k_caches=[ks[0], ks[1][:, ::2], ks[2]], v_caches=[vs[0], vs[1][:, ::2], vs[2]])
    with pytest.raises(ShapeError):  # read-only cache
        ro = ks[1].copy()
        ro.flags.writeable = False
        call(k_caches=[ks[0], ro, ks[2]])
    with pytest.raises(ShapeError, match="overlap"):  # shared scratch would race
        call(scores=[scores[0], scores[0], scores[2]])
    with pytest.raises(ShapeError):
        call(k_caches=[], v_caches=[], positions=[], scores=[], qkv=qkv[:0])
    with pytest.raises(ShapeError):  # heads that do not divide
        call(n_heads=3)
