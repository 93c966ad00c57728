"""The numpy reference of ternary math (ternlm.ternary) against its own definitions, written independently."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ternlm import ternary as T
from ternlm.errors import ShapeError

shapes = st.tuples(st.integers(1, 9), st.integers(1, 700))


def random_ternary(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


# ---- packing -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(shape, seed):
    n, k = shape
    w = random_ternary(np.random.default_rng(seed), n, k)
    packed = T.pack(w)
    assert packed.dtype == np.uint8
    assert packed.shape == (n, T.padded_k(k) // 4)
    np.testing.assert_array_equal(T.unpack(packed, k), w)
    np.testing.assert_array_equal(T.unpack_codes(packed, k), (w + 1).astype(np.uint8))
    np.testing.assert_array_equal(T.pack_codes((w + 1).astype(np.uint8)), packed)


def test_pack_layout_by_hand():
    """Column 256b + 64q + j lands in byte 64b + j, bits 2q..2q+1; padding is code 1 (weight 0)."""
    k = 300
    for col in (0, 63, 64, 130, 199, 255, 256, 299):
        w = np.zeros((1, k), np.int8)
        w[0, col] = 1  # code 2 among codes 1
        packed = T.pack(w)
        b, rem = divmod(col, 256)
        q, j = divmod(rem, 64)
        expected = np.full(packed.shape[1], 0b01010101, np.uint8)
        expected[64 * b + j] = 0b01010101 & ~(3 << (2 * q)) | (2 << (2 * q))
        np.testing.assert_array_equal(packed[0], expected)


def test_padded_k():
    assert [T.padded_k(k) for k in (1, 255, 256, 257, 6912, 6913)] == [256, 256, 256, 512, 6912, 7168]
    with pytest.raises(ShapeError):
        T.padded_k(0)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[2, 0]], np.int8),  # out of range
        np.array([[-2, 0]], np.int8),
        np.zeros((2, 3), np.int16),  # wrong dtype
        np.zeros(5, np.int8),  # wrong ndim
        np.zeros((0, 5), np.int8),  # empty
    ],
)
def test_pack_rejects(bad):
    with pytest.raises(ShapeError):
        T.pack(bad)


def test_pack_codes_and_unpack_reject():
    with pytest.raises(ShapeError):
        T.pack_codes(np.array([[3, 1]], np.uint8))
    packed = T.pack(np.zeros((2, 10), np.int8))
    with pytest.raises(ShapeError):
        T.unpack(packed, 257)  # more columns than the rows hold
    with pytest.raises(ShapeError):
        T.unpack(packed[:, :10], 10)  # not whole 64-byte blocks
    bad = packed.copy()
    bad[0, 0] = 0xFF  # code 3
    with pytest.raises(ShapeError):
        T.unpack(bad, 10)


# ---- weights -------------------------------------------------------------------------------------


def test_ternarize_matches_formula():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((37, 300)) * 0.02).astype(np.float32)
    wq, w_scale = T.ternarize(w)
    mean = np.float32(np.mean(np.abs(w.astype(np.float64))))
    s = np.float32(1) / mean
    expected = np.clip(np.rint(w * s), -1, 1).astype(np.int8)
    np.testing.assert_array_equal(wq, expected)
    assert w_scale == float(np.float32(1) / s)
    assert w_scale == pytest.approx(float(mean), rel=1e-6)


def test_ternarize_all_zero_uses_floor():
    wq, w_scale = T.ternarize(np.zeros((4, 8), np.float32))
    assert not wq.any()
    assert w_scale == pytest.approx(1e-5, rel=1e-6)


def test_ternarize_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)
    tw = torch.from_numpy(w)
    s = 1 / tw.abs().mean().clamp(min=1e-5)  # transformers' BitNet weight_quant
    expected = (tw * s).round().clamp(-1, 1).to(torch.int8).numpy()
    wq, w_scale = T.ternarize(w)
    assert w_scale == pytest.approx(float(1 / s), rel=1e-6)
    assert np.mean(wq != expected) < 1e-3  # the float32 means may differ in the last bit


# ---- activations ---------------------------------------------------------------------------------


def quantize_by_hand(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element by element with Python's round() (half to even) on float32 products."""
    m, k = x.shape
    xq = np.zeros((m, T.padded_k(k)), np.int8)
    scales = np.zeros(m, np.float32)
    for i in range(m):
        amax = max(abs(float(v)) for v in x[i])
        s = np.float32(127) / np.float32(max(amax, np.float32(1e-5)))
        scales[i] = s
        for j in range(k):
            xq[i, j] = min(127, max(-128, round(float(np.float32(x[i, j]) * s))))
    return xq, scales


@settings(max_examples=80, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 40)),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True),
    )
)
def test_quantize_matches_formula(x):
    xq, a_scale, sums = T.quantize_activations(x)
    exp_q, exp_s = quantize_by_hand(x)
    np.testing.assert_array_equal(xq, exp_q)
    np.testing.assert_array_equal(a_scale, exp_s)
    np.testing.assert_array_equal(sums, exp_q.astype(np.int64).sum(axis=1))


@settings(max_examples=40, deadline=None)
@given(halves=st.lists(st.integers(-127, 126), min_size=1, max_size=30), amax=st.sampled_from([127.0, 254.0]))
def test_quantize_ties_round_half_even(halves, amax):
    # amax 127 gives a_scale 1 and amax 254 gives 0.5, so these products are exact n + 0.5 ties.
    f = amax / 127
    x = np.array([[amax] + [(h + 0.5) * f for h in halves]], np.float32)
    xq, a_scale, _ = T.quantize_activations(x)
    assert a_scale[0] == np.float32(127 / amax)
    expected = [127] + [round(h + 0.5) for h in halves]  # Python round is half to even
    np.testing.assert_array_equal(xq[0, : len(expected)], expected)
    assert all(v % 2 == 0 for v in expected[1:])


def test_quantize_zero_row_and_padding():
    x = np.zeros((2, 300), np.float32)
    x[1, 5] = 3e-6  # below the 1e-5 floor: scale stays 127 / 1e-5
    xq, a_scale, sums = T.quantize_activations(x)
    assert xq.shape == (2, 512)
    np.testing.assert_array_equal(a_scale, np.float32(127) / np.float32(1e-5))
    assert not xq[0].any() and sums[0] == 0
    assert xq[1, 5] == round(float(np.float32(3e-6) * a_scale[1]))
    assert not xq[:, 300:].any()


def test_quantize_rejects():
    for bad in (np.zeros((2, 3), np.float64), np.zeros(3, np.float32), np.zeros((0, 3), np.float32)):
        with pytest.raises(ShapeError):
            T.quantize_activations(bad)


# ---- matmuls -------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 9), k=st.integers(1, 600), seed=st.integers(0, 2**32 - 1))
def test_ternary_matmul_reference(m, n, k, seed):
    rng = np.random.default_rng(seed)
    w = random_ternary(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xq, a_scale, sums = T.quantize_activations(x)
    acc = T.ternary_matmul_i32(T.pack(w), xq, sums)
    expected = xq[:, :k].astype(np.int64) @ w.T.astype(np.int64)
    np.testing.assert_array_equal(acc, expected)
    y = T.ternary_matmul(T.pack(w), xq, a_scale, sums, 0.25)
    ratio = np.float32(0.25) / a_scale
    np.testing.assert_array_equal(y, expected.astype(np.float32) * ratio[:, None])


def test_ternary_matmul_rejects_k_pad_mismatch():
    packed = T.pack(np.zeros((3, 300), np.int8))
    xq, _, sums = T.quantize_activations(np.ones((1, 200), np.float32))
    with pytest.raises(ShapeError):
        T.ternary_matmul_i32(packed, xq, sums)


def test_bf16_round_trip():
    x = np.array([1.0, -2.5, 3.1415927, 1e-30, 65504.0, np.inf, -0.0], np.float32)
    b = T.f32_to_bf16(x)
    back = T.bf16_to_f32(b)
    np.testing.assert_allclose(back, x, rtol=2**-8)
    assert T.bf16_to_f32(T.f32_to_bf16(back)).tobytes() == back.tobytes()  # exact on bf16 values
    # ties to even: 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7
    assert T.bf16_to_f32(T.f32_to_bf16(np.array([1 + 2**-8], np.float32)))[0] == 1.0
    assert np.isnan(T.bf16_to_f32(T.f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_float_matmul_reference():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 33)).astype(np.float32)
    x = rng.standard_normal((2, 33)).astype(np.float32)
    np.testing.assert_allclose(T.float_matmul(w, x), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5)
    wb = T.f32_to_bf16(w)
    np.testing.assert_allclose(T.float_matmul(wb, x), x @ T.bf16_to_f32(wb).T, rtol=1e-6)
    with pytest.raises(ShapeError):
        T.float_matmul(w.astype(np.float64), x)


def test_ternary_matmul_per_row_scale():
    rng = np.random.default_rng(4)
    w = random_ternary(rng, 6, 300)
    xq, a_scale, sums = T.quantize_activations(rng.standard_normal((2, 300)).astype(np.float32))
    w_scale = rng.uniform(0.1, 1.0, 6).astype(np.float32)
    y = T.ternary_matmul(T.pack(w), xq, a_scale, sums, w_scale)
    acc = (xq[:, :300].astype(np.int64) @ w.T.astype(np.int64)).astype(np.float32)
    for r in range(6):
        np.testing.assert_array_equal(y[:, r], acc[:, r] * (w_scale[r] / a_scale))
    with pytest.raises(ShapeError):
        T.ternary_matmul(T.pack(w), xq, a_scale, sums, w_scale[:5])


# ---- Q8_0 ----------------------------------------------------------------------------------------


def test_q8_0_weights_round_trip():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((7, 96)) * 0.05).astype(np.float32)
    w[1, 32:64] = 0.0
    q, d = T.quantize_q8_0(w)
    assert q.dtype == np.int8 and d.dtype == np.float16 and d.shape == (7, 3)
    assert np.abs(q).max() == 127 and not q[1, 32:64].any() and d[1, 1] == 0
    back = T.dequantize_q8_0(q, d)
    step = np.repeat(d.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(back - w) <= 0.5 * step + 1e-3 * step)  # half a step, plus float16 rounding of d
    with pytest.raises(ShapeError):
        T.quantize_q8_0(np.ones((2, 40), np.float32))


def test_quantize_act_q8_0_by_hand():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[0, 5] = 40.0  # an outlier only costs its own block precision
    x[1, 32:] = 0.0
    xq, xd = T.quantize_act_q8_0(x)
    for i in range(2):
        for b in range(2):
            blk = x[i, 32 * b : 32 * b + 32]
            amax = np.float32(np.abs(blk).max())
            if amax == 0:
                assert xd[i, b] == 0 and not xq[i, 32 * b : 32 * b + 32].any()
                continue
            assert xd[i, b] == amax / np.float32(127)
            inv = np.float32(127) / amax
            expected = [min(127, max(-127, round(float(v * inv)))) for v in blk]
            np.testing.assert_array_equal(xq[i, 32 * b : 32 * b + 32], expected)


def test_q8_matmul_order():
    """The documented order: 16 lane sums by block index mod 16, then a halving tree."""
    rng = np.random.default_rng(7)
    n, k = 3, 32 * 37
    q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    d = rng.uniform(0, 0.01, size=(n, k // 32)).astype(np.float16)
    xq = rng.integers(-127, 128, size=(1, k), dtype=np.int8)
    xd = rng.uniform(0, 0.1, size=(1, k // 32)).astype(np.float32)
    y = T.q8_matmul(q, d, xq, xd)
    for r in range(n):
        lanes = [np.float32(0)] * 16
        for b in range(k // 32):
            isum = int(q[r, 32 * b : 32 * b + 32].astype(np.int64) @ xq[0, 32 * b : 32 * b + 32].astype(np.int64))
            lanes[b % 16] = np.float32(lanes[b % 16] + np.float32(isum) * (np.float32(d[r, b]) * xd[0, b]))
        for half in (8, 4, 2, 1):
            lanes = [np.float32(lanes[i] + lanes[i + half]) for i in range(half)]
        assert y[0, r] == lanes[0]
