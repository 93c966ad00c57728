"""Every kernel on every ISA this CPU supports, against the numpy reference in ternlm.ternary.

Tolerances: quantization and the int32 accumulator must be bit-identical; the scaled ternary output
too (the same float32 operations: one division per row, one multiply per element); float matmuls
sum in a different order than BLAS, so |y - ref| <= 1e-5 * (|x| @ |w|ᵀ) + 1e-30.
"""

import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ternlm import kernels as K
from ternlm import ternary as T
from ternlm.errors import KernelError, ShapeError

ISAS = K.available_isas()
needs_ext = pytest.mark.skipif(K._ext is None, reason="C extension not built")


@pytest.fixture(params=ISAS)
def isa(request):
    before = K.active_isa()
    K.set_isa(request.param)
    yield request.param
    K.set_isa(before)


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = K.get_threads()
    K.set_threads(request.param)
    yield request.param
    K.set_threads(before)


def random_case(rng, m, n, k, scale=1.0):
    w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    return w, T.pack(w), x


# ---- quantization --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 300)),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True),
    )
)
def test_quantize_bit_identical(x):
    expected = T.quantize_activations(x)
    for name in ISAS:
        K.set_isa(name)
        got = K.quantize_activations(x)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e, err_msg=name)
    K.set_isa(ISAS[-1])


@settings(max_examples=30, deadline=None)
@given(halves=st.lists(st.integers(-127, 126), min_size=1, max_size=70), amax=st.sampled_from([127.0, 254.0]))
def test_quantize_ties(halves, amax):
    # a_scale is exactly 1 or 0.5, so every product is an exact n + 0.5 tie
    x = np.array([[amax] + [(h + 0.5) * amax / 127 for h in halves]], np.float32)
    expected = T.quantize_activations(x)
    for name in ISAS:
        K.set_isa(name)
        for g, e in zip(K.quantize_activations(x), expected, strict=True):
            np.testing.assert_array_equal(g, e, err_msg=name)
    K.set_isa(ISAS[-1])


def test_quantize_zero_rows_and_out(isa):
    x = np.zeros((3, 257), np.float32)
    x[1] = np.linspace(-1e-6, 1e-6, 257)
    out = (np.full((3, 512), 7, np.int8), np.empty(3, np.float32), np.empty(3, np.int32))
    got = K.quantize_activations(x, out=out)
    assert got[0] is out[0]
    for g, e in zip(got, T.quantize_activations(x), strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("m,k,k_pad", [(1, 2560, 2560), (3, 6912, 6912), (2, 100, 320), (4, 64, 64)])
def test_norm_quantize_is_rmsnorm_then_quantize(isa, m, k, k_pad):
    """RMSNorm fused into the quantization: the bits of the two steps (each tested against numpy alone)."""
    rng = np.random.default_rng(m * k)
    x = (rng.standard_normal((m, k)) * 4).astype(np.float32)
    w = rng.standard_normal(k).astype(np.float32)
    fused = K.quantize_activations(x, k_pad=k_pad, norm=w, eps=1e-5)
    for got, two_steps in zip(fused, K.quantize_activations(K.rmsnorm(x, w, 1e-5), k_pad=k_pad), strict=True):
        np.testing.assert_array_equal(got, two_steps)
    with pytest.raises(ShapeError, match="norm"):
        K.quantize_activations(x, k_pad=k_pad, norm=w[:-1], eps=1e-5)


# ---- ternary matmul ------------------------------------------------------------------------------


def check_ternary(rng, m, n, k):
    w, packed, x = random_case(rng, m, n, k)
    xq, a_scale, sums = K.quantize_activations(x)
    acc = K.ternary_matmul_i32(packed, xq, sums)
    np.testing.assert_array_equal(acc, xq[:, :k].astype(np.int64) @ w.T.astype(np.int64))
    w_scale = float(rng.uniform(0.01, 2.0))
    y = K.ternary_matmul(packed, xq, a_scale, sums, w_scale)
    assert y.dtype == np.float32 and y.shape == (m, n)
    np.testing.assert_array_equal(y, T.ternary_matmul(packed, xq, a_scale, sums, w_scale))


def test_gemv_shapes(isa, threads):
    rng = np.random.default_rng(10 + threads)
    for n, k in [(1, 1), (3, 255), (4, 256), (7, 257), (64, 2560), (301, 2999), (257, 1000)]:
        check_ternary(rng, 1, n, k)


def test_gemm_shapes(isa, threads):
    rng = np.random.default_rng(20 + threads)
    for _ in range(6):
        m = int(rng.integers(2, 71))
        n = int(rng.integers(1, 301))
        k = int(rng.integers(1, 3001))
        check_ternary(rng, m, n, k)
    check_ternary(rng, 70, 300, 3000)
    for m in (4, 5, 8, 16, 17):  # both sides of the register / panel switch (batched decode vs prefill)
        check_ternary(rng, m, 37, 700)


def test_gemm_tile_edges(isa, threads):
    """Token counts and row counts on both sides of the 16-wide tiles, the 32-token L1 / panel switch, and row
    ranges that leave fewer than 16 rows (those go to the vector kernel)."""
    rng = np.random.default_rng(30 + threads)
    for m in (4, 5, 8, 15, 16, 17, 31, 32, 33, 47, 64, 65):
        for n in (15, 16, 31, 32, 48, 81):
            check_ternary(rng, m, n, 300)


def test_extreme_activations(isa):
    """All activations at ±127 or -128 and all weights ±1: the largest accumulators."""
    k, n = 4096, 8
    packed = T.pack(np.ones((n, k), np.int8))
    packed_neg = T.pack(-np.ones((n, k), np.int8))
    xq = np.full((2, k), 127, np.int8)
    xq[1] = -128
    sums = xq.sum(axis=1, dtype=np.int32)
    np.testing.assert_array_equal(K.ternary_matmul_i32(packed, xq, sums)[:, 0], [127 * k, -128 * k])
    np.testing.assert_array_equal(K.ternary_matmul_i32(packed_neg, xq, sums)[:, 0], [-127 * k, 128 * k])


def test_per_row_w_scale(isa, threads):
    """Fused projections: one float32 scale per output row, bit-identical to the numpy reference."""
    rng = np.random.default_rng(6)
    for m, n, k in [(1, 7, 300), (1, 130, 2560), (5, 33, 700)]:
        _, packed, x = random_case(rng, m, n, k)
        xq, a_scale, sums = K.quantize_activations(x)
        w_scale = rng.uniform(0.01, 2.0, n).astype(np.float32)
        y = K.ternary_matmul(packed, xq, a_scale, sums, w_scale)
        acc = K.ternary_matmul_i32(packed, xq, sums).astype(np.float32)
        np.testing.assert_array_equal(y, acc * (w_scale[None, :] / a_scale[:, None]))
        np.testing.assert_array_equal(y, T.ternary_matmul(packed, xq, a_scale, sums, w_scale))
        # a constant array equals the scalar path
        np.testing.assert_array_equal(
            K.ternary_matmul(packed, xq, a_scale, sums, np.full(n, 0.75, np.float32)),
            K.ternary_matmul(packed, xq, a_scale, sums, 0.75),
        )
    for bad in (w_scale[:-1], w_scale.astype(np.float64), w_scale.reshape(1, -1)):
        with pytest.raises(ShapeError):
            K.ternary_matmul(packed, xq, a_scale, sums, bad)


def test_out_buffer_reused(isa):
    rng = np.random.default_rng(5)
    _, packed, x = random_case(rng, 3, 10, 300)
    xq, a_scale, sums = K.quantize_activations(x)
    out = np.empty((3, 10), np.float32)
    assert K.ternary_matmul(packed, xq, a_scale, sums, 0.5, out=out) is out
    np.testing.assert_array_equal(out, T.ternary_matmul(packed, xq, a_scale, sums, 0.5))


# ---- float matmul --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_float_matmul(isa, threads, dtype):
    rng = np.random.default_rng(30)
    for m, n, k in [(1, 1, 1), (1, 37, 15), (1, 300, 2560), (3, 5, 17), (9, 70, 1000), (70, 13, 300)]:
        w32 = rng.standard_normal((n, k)).astype(np.float32)
        w = {"f32": w32, "f16": w32.astype(np.float16), "bf16": T.f32_to_bf16(w32)}[dtype]
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = K.float_matmul(w, x)
        ref = T.float_matmul(w, x)
        wf = T.bf16_to_f32(w) if dtype == "bf16" else w.astype(np.float32)
        bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wf).T.astype(np.float64)) + 1e-30
        assert y.shape == (m, n) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= bound), (m, n, k)


def test_float16_special_values(isa):
    w = np.array([[1.0, -2.0, 6.1e-5, 5.96e-8, 65504.0, -0.0]], np.float16)  # incl. subnormals
    x = np.ones((1, 6), np.float32)
    assert K.float_matmul(w, x)[0, 0] == pytest.approx(float(w.astype(np.float64).sum()), rel=1e-6)


# ---- Q8_0 head ----------------------------------------------------------------------------------


def q8_case(rng, m, n, k, outlier=True):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outlier:
        x[:, rng.integers(0, k)] *= 100.0  # hidden states have outlier dimensions
    return T.quantize_q8_0(w), x


Q8_SHAPES = [(1, 1, 32), (1, 5, 64), (1, 9, 96), (1, 37, 2560), (1, 131, 544), (2, 3, 512), (3, 11, 1056), (7, 6, 32),
              (8, 9, 1056), (11, 5, 544),  # batched decode: 2 x 4, 2 x 2 and 2 x 1 tiles
              (6, 16, 64), (7, 48, 544), (16, 33, 2560), (20, 40, 1056), (33, 17, 96)]  # AMX: 16-row, 16-token edges


def test_q8_quantize_bit_identical(isa):
    rng = np.random.default_rng(60)
    for m, _, k in Q8_SHAPES:
        x = (rng.standard_normal((m, k)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
        got = K.quantize_act_q8_0(x)
        for g, e in zip(got, T.quantize_act_q8_0(x), strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
            np.testing.assert_array_equal(g, e)
        assert got[1][0, 0] == 0 and not got[0][0, :32].any()


def test_q8_matmul_bit_identical(isa, threads):
    """The float result is bit-identical (fixed summation order), for n not a multiple of the row tile."""
    rng = np.random.default_rng(61 + threads)
    for m, n, k in Q8_SHAPES:
        (q, d), x = q8_case(rng, m, n, k)
        xq, xd = K.quantize_act_q8_0(x)
        y = K.q8_matmul(q, d, xq, xd)
        assert y.dtype == np.float32 and y.shape == (m, n)
        np.testing.assert_array_equal(y.view(np.uint32), T.q8_matmul(q, d, xq, xd).view(np.uint32))


def test_q8_block_dots_integer_exact(isa):
    """With every scale 1 the output is the exact integer sum of the block dots (< 2^24): compares the
    integer part of every kernel against numpy, extremes included (|q| = 127 everywhere)."""
    rng = np.random.default_rng(62)
    for m, n, k in Q8_SHAPES:
        q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        lim = 128 if k <= 1024 else 4  # every partial sum below 2^24, where float32 is exact
        xq = rng.integers(1 - lim, lim, size=(m, k), dtype=np.int8)
        q[0] = 127
        xq[0, : min(k // 2, 960)] = -127
        ones_w = np.ones((n, k // 32), np.float16)
        ones_x = np.ones((m, k // 32), np.float32)
        exact = xq.astype(np.int64) @ q.T.astype(np.int64)
        assert (np.abs(xq).astype(np.int64) @ np.abs(q).T.astype(np.int64)).max() < 2**24
        np.testing.assert_array_equal(K.q8_matmul(q, ones_w, xq, ones_x), exact.astype(np.float32))
        np.testing.assert_array_equal(T.q8_block_dots(q, xq).sum(axis=2), exact)


def test_q8_reference_formula():
    rng = np.random.default_rng(63)
    (q, d), x = q8_case(rng, 3, 20, 256)
    xq, xd = T.quantize_act_q8_0(x)
    y = T.q8_matmul(q, d, xq, xd)
    exact = (T.q8_block_dots(q, xq) * (d.astype(np.float64)[None] * xd.astype(np.float64)[:, None])).sum(axis=2)
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    # and close to the float head it replaces (outlier column included)
    ref = x @ T.dequantize_q8_0(q, d).T
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()


def test_q8_bad_inputs():
    rng = np.random.default_rng(64)
    (q, d), x = q8_case(rng, 2, 8, 64)
    xq, xd = K.quantize_act_q8_0(x)
    with pytest.raises(ShapeError):
        K.quantize_act_q8_0(np.ones((2, 40), np.float32))  # k not a multiple of 32
    for args in [
        (q.view(np.uint8), d, xq, xd),
        (q, d.astype(np.float32), xq, xd),
        (q, d[:, :1], xq, xd),
        (q, d, xq[:, :32], xd),
        (q, d, xq, xd[:, :1]),
        (q, d, xq, xd.astype(np.float64)),
        (q[:, ::2], d, xq, xd),
    ]:
        with pytest.raises(ShapeError):
            K.q8_matmul(*args)
    with pytest.raises(ShapeError):
        K.q8_matmul(q, d, xq, xd, out=np.empty((2, 7), np.float32))
    if K._ext is not None:
        with pytest.raises(ShapeError):  # the C layer checks k itself
            K._ext.q8_matmul(q, d, 8, 48, xq, xd, 2, np.empty((2, 8), np.float32))


# ---- Q4_0 head ----------------------------------------------------------------------------------

# tails of a 512-column AVX-512 group of 0-3, 5-7, 10 and 15 blocks (full and partial 4-block chunks)
Q4_SHAPES = [*Q8_SHAPES, (1, 13, 160), (3, 7, 192), (1, 6, 224), (1, 11, 320), (2, 9, 736), (1, 4, 992),
             (5, 7, 480), (4, 5, 2560)]


def test_q4_format():
    """Values in [-7, 7], d = f16(amax / 7), nibbles u = q + 8: low = first 16 columns of a block."""
    rng = np.random.default_rng(70)
    w = (rng.standard_normal((5, 96)) * 0.05).astype(np.float32)
    w[1, :32] = 0.0  # an all-zero block: d = 0, q = 0
    q4, d = T.quantize_q4_0(w)
    assert q4.dtype == np.uint8 and q4.shape == (5, 48) and d.dtype == np.float16 and d.shape == (5, 3)
    q = T.unpack_q4_0(q4)
    assert q.min() >= -7 and q.max() <= 7 and d[1, 0] == 0 and not q[1, :32].any()
    np.testing.assert_array_equal(d, (np.abs(w.reshape(5, 3, 32)).max(axis=2) / 7).astype(np.float16))
    np.testing.assert_array_equal(q4[:, :16] & 15, q[:, :16] + 8)
    np.testing.assert_array_equal(q4[:, :16] >> 4, q[:, 16:32] + 8)
    err = T.dequantize_q4_0(q4, d) - w
    assert (np.abs(err).reshape(5, 3, 32) <= d.astype(np.float32)[:, :, None] * 0.5 + 1e-6).all()


def test_q4_matmul_bit_identical(isa, threads):
    """Bit-identical to numpy (the float order of q8_matmul), n not a multiple of the row tile, m >= 1."""
    rng = np.random.default_rng(71 + threads)
    for m, n, k in Q4_SHAPES:
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        q4, d = T.quantize_q4_0(w)
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, rng.integers(0, k)] *= 100.0
        xq, xd = K.quantize_act_q8_0(x)
        y = K.q4_matmul(q4, d, xq, xd)
        assert y.dtype == np.float32 and y.shape == (m, n)
        np.testing.assert_array_equal(y.view(np.uint32), T.q4_matmul(q4, d, xq, xd).view(np.uint32))


def test_q4_block_dots_integer_exact(isa):
    """Scales 1: the exact integer sum, for any nibble (0 included, i.e. q = -8) and xq = ±127."""
    rng = np.random.default_rng(72)
    for m, n, k in Q4_SHAPES:
        q4 = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
        q4[0] = 0  # q = -8 everywhere
        xq = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
        xq[0, : k // 2] = 127
        exact = xq.astype(np.int64) @ T.unpack_q4_0(q4).T.astype(np.int64)
        ones_w, ones_x = np.ones((n, k // 32), np.float16), np.ones((m, k // 32), np.float32)
        np.testing.assert_array_equal(K.q4_matmul(q4, ones_w, xq, ones_x), exact.astype(np.float32))


def test_q4_reference_close_to_float():
    rng = np.random.default_rng(73)
    w = (rng.standard_normal((20, 256)) * 0.05).astype(np.float32)
    q4, d = T.quantize_q4_0(w)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = T.q4_matmul(q4, d, *T.quantize_act_q8_0(x))
    ref = x @ T.dequantize_q4_0(q4, d).T
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()
    assert np.abs(y - x @ w.T).max() <= 0.2 * np.abs(x @ w.T).max()


def test_q4_bad_inputs():
    rng = np.random.default_rng(74)
    q4, d = T.quantize_q4_0((rng.standard_normal((8, 64))).astype(np.float32))
    xq, xd = K.quantize_act_q8_0(rng.standard_normal((2, 64)).astype(np.float32))
    with pytest.raises(ShapeError):
        T.quantize_q4_0(np.ones((2, 40), np.float32))  # k not a multiple of 32
    for args in [
        (q4.view(np.int8), d, xq, xd),
        (q4, d.astype(np.float32), xq, xd),
        (q4, d[:, :1], xq, xd),
        (q4, d, xq[:, :32], xd),
        (q4[:, :16], d, xq, xd),
        (q4, d, xq, xd[:, :1]),
        (q4, d, xq, xd.astype(np.float64)),
        (q4[:, ::2], d, xq[:, :32], xd),
    ]:
        with pytest.raises(ShapeError):
            K.q4_matmul(*args)
    with pytest.raises(ShapeError):
        K.q4_matmul(q4, d, xq, xd, out=np.empty((2, 7), np.float32))
    if K._ext is not None:
        with pytest.raises(ShapeError):  # the C layer checks k itself
            K._ext.q4_matmul(q4, d, 8, 48, xq, xd, 2, np.empty((2, 8), np.float32))


# ---- threads -------------------------------------------------------------------------------------


@needs_ext
def test_concurrent_callers():
    """Two Python threads calling kernels at once (GIL released), each naming the other's weights to read
    ahead, both get correct results."""
    K.set_threads(2)
    rng = np.random.default_rng(40)
    cases = [random_case(rng, m, 200, 1000) for m in (1, 5)]
    expected = []
    for _, packed, x in cases:
        q = T.quantize_activations(x)
        expected.append(T.ternary_matmul(packed, q[0], q[1], q[2], 1.0))
    errors = []

    def work(i):
        _, packed, x = cases[i]
        for _ in range(200):
            q = K.quantize_activations(x)
            if not np.array_equal(K.ternary_matmul(packed, *q, 1.0, next=cases[1 - i][1]), expected[i]):
                errors.append(i)

    ts = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


@needs_ext
@pytest.mark.parametrize("threads", [2, 3], indirect=True)
def test_read_ahead_gives_the_same_bits(isa, threads):
    """Each call names the next one's weights; between calls a worker reads them ahead and the next call
    hands it more rows (a different split of every matrix): every output keeps the reference's bits."""
    rng = np.random.default_rng(42)
    ternary = [random_case(rng, m, n, 2048) for m, n in ((1, 3000), (1, 1024), (3, 2000))]
    (q8, d8), x8 = q8_case(rng, 1, 2048, 256)
    q4, d4 = T.quantize_q4_0(rng.standard_normal((2048, 256)).astype(np.float32))
    f16 = rng.standard_normal((2048, 256)).astype(np.float16)
    xq8 = K.quantize_act_q8_0(x8)
    calls = [(packed, lambda packed=packed, x=x, nxt=None: K.ternary_matmul(packed, *K.quantize_activations(x), 1.0,
                                                                           next=nxt),
              T.ternary_matmul(packed, *T.quantize_activations(x), 1.0)) for _, packed, x in ternary]
    calls += [(q8, lambda nxt=None: K.q8_matmul(q8, d8, *xq8, next=nxt), T.q8_matmul(q8, d8, *xq8)),
              (q4, lambda nxt=None: K.q4_matmul(q4, d4, *xq8, next=nxt), T.q4_matmul(q4, d4, *xq8)),
              (f16, lambda nxt=None: K.float_matmul(f16, x8, next=nxt), K.float_matmul(f16, x8))]
    for rep in range(20):
        for i, (_, call, expected) in enumerate(calls):
            got = call(nxt=calls[(i + 1) % len(calls)][0])
            np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32), err_msg=f"call {i}")
            if rep % 2:  # leave the worker time to read ahead
                time.sleep(0.0002)


@needs_ext
def test_read_ahead_keeps_its_target_alive():
    """The pool holds the weights it reads ahead until a later call names others, so dropping the last
    Python reference to them in between cannot free memory a worker is reading."""
    K.set_threads(2)
    rng = np.random.default_rng(43)
    _, packed, x = random_case(rng, 1, 512, 1024)
    q = K.quantize_activations(x)
    target = rng.integers(0, 255, size=(4096, 512), dtype=np.uint8)
    before = sys.getrefcount(target)
    K.ternary_matmul(packed, *q, 1.0, next=target)
    assert sys.getrefcount(target) == before + 1
    K.ternary_matmul(packed, *q, 1.0, next=packed)
    assert sys.getrefcount(target) == before
    K.set_threads(1)  # one thread reads nothing ahead, so it holds nothing
    K.ternary_matmul(packed, *q, 1.0, next=target)
    assert sys.getrefcount(target) == before
    with pytest.raises(ShapeError, match="next"):
        K.ternary_matmul(packed, *q, 1.0, next=target[:, ::2])
    K.set_threads(K.default_threads())


@needs_ext
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork():
    K.set_threads(2)
    rng = np.random.default_rng(41)
    _, packed, x = random_case(rng, 1, 64, 512)
    q = K.quantize_activations(x)
    expected = K.ternary_matmul(packed, *q, 1.0)  # the pool is running before the fork
    pid = os.fork()
    if pid == 0:
        ok = np.array_equal(K.ternary_matmul(packed, *q, 1.0), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_thread_settings():
    before = K.get_threads()
    K.set_threads(3)
    assert K.get_threads() == 3
    K.set_threads(before)
    assert K.default_threads() >= 1
    with pytest.raises(KernelError):
        K.set_threads(0)
    with pytest.raises(KernelError):
        K.set_isa("no-such-isa")
    assert K.active_isa() in ISAS


# ---- bad inputs raise, never crash ---------------------------------------------------------------


@pytest.fixture
def good():
    rng = np.random.default_rng(50)
    _, packed, x = random_case(rng, 2, 12, 300)
    xq, a_scale, sums = K.quantize_activations(x)
    return packed, xq, a_scale, sums, x


def test_quantize_bad_inputs():
    bad = [
        np.zeros((2, 8), np.float64),  # dtype
        np.zeros(8, np.float32),  # ndim
        np.zeros((4, 16), np.float32)[:, ::2],  # not contiguous
        [[1.0, 2.0]],  # not an array
    ]
    for x in bad:
        with pytest.raises(ShapeError):
            K.quantize_activations(x)
    x = np.ones((2, 300), np.float32)
    with pytest.raises(ShapeError):  # out too small
        K.quantize_activations(x, out=(np.empty((2, 256), np.int8), np.empty(2, np.float32), np.empty(2, np.int32)))
    with pytest.raises(ShapeError):  # out of the wrong dtype
        K.quantize_activations(x, out=(np.empty((2, 512), np.int8), np.empty(2, np.float64), np.empty(2, np.int32)))


def test_ternary_bad_inputs(good):
    packed, xq, a_scale, sums, _ = good
    cases = [
        (packed.view(np.int8), xq, a_scale, sums),  # packed dtype
        (packed[:, :64], xq, a_scale, sums),  # k_pad mismatch
        (packed[::2], xq, a_scale, sums),  # not contiguous
        (packed, xq.astype(np.int16), a_scale, sums),  # xq dtype
        (packed, xq, a_scale[:1], sums),  # a_scale too short
        (packed, xq, a_scale.astype(np.float64), sums),  # a_scale dtype
        (packed, xq, a_scale, sums[:1]),  # sums too short
        (packed, xq, a_scale, sums.astype(np.int64)),  # sums dtype
        (packed[0], xq, a_scale, sums),  # ndim
    ]
    for args in cases:
        with pytest.raises(ShapeError):
            K.ternary_matmul(*args, 1.0)
    with pytest.raises(ShapeError):
        K.ternary_matmul(packed, xq, a_scale, sums, 1.0, out=np.empty((2, 11), np.float32))
    ro = np.empty((2, 12), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ShapeError):
        K.ternary_matmul(packed, xq, a_scale, sums, 1.0, out=ro)
    with pytest.raises(ShapeError):
        K.ternary_matmul_i32(packed, xq, sums, out=np.empty((2, 12), np.float32))


def test_float_bad_inputs():
    w = np.ones((4, 8), np.float32)
    x = np.ones((2, 8), np.float32)
    for bw, bx in [(w.astype(np.float64), x), (w, x[:, :7]), (w, x.astype(np.float16)), (w[:, ::2], x[:, :4])]:
        with pytest.raises(ShapeError):
            K.float_matmul(bw, bx)
    with pytest.raises(ShapeError):
        K.float_matmul(w, x, out=np.empty((2, 3), np.float32))


@needs_ext
def test_extension_validates_sizes(good):
    """The C layer checks sizes itself: wrong sizes or short buffers raise instead of overrunning."""
    packed, xq, a_scale, sums, x = good
    ext = K._ext
    n, kp = packed.shape[0], xq.shape[1]
    y = np.empty((2, n), np.float32)
    with pytest.raises(ShapeError):  # m larger than the buffers hold
        ext.ternary_matmul(packed, n, kp, xq, sums, a_scale, 1.0, 3, y, None)
    with pytest.raises(ShapeError):  # n larger than packed holds
        ext.ternary_matmul(packed, n + 1, kp, xq, sums, a_scale, 1.0, 2, y, None)
    with pytest.raises(ShapeError):  # k_pad not a multiple of 256
        ext.ternary_matmul(packed, n, kp - 4, xq, sums, a_scale, 1.0, 2, y, None)
    with pytest.raises(ShapeError):  # both outputs
        ext.ternary_matmul(packed, n, kp, xq, sums, a_scale, 1.0, 2, y, y)
    with pytest.raises(ShapeError):  # zero size
        ext.ternary_matmul(packed, 0, kp, xq, sums, a_scale, 1.0, 2, y, None)
    with pytest.raises(ShapeError):  # size product overflows
        ext.ternary_matmul(packed, 2**62, kp, xq, sums, a_scale, 1.0, 2, y, None)
    with pytest.raises(KernelError):  # k > k_pad: rejected by the C API itself
        ext.quantize(np.ones((2, 600), np.float32), np.empty((2, 512), np.int8), a_scale, sums, 2, 600, 512)
    with pytest.raises(KernelError):  # k_pad above the documented bound
        ext.ternary_matmul(
            np.empty(2**21, np.uint8),
            1,
            2**23,
            np.empty(2**23, np.int8),
            sums[:1],
            a_scale[:1],
            1.0,
            1,
            y[:1, :1].copy(),
            None,
        )
    with pytest.raises(KernelError):
        ext.float_matmul(np.ones((4, 8), np.float32), 7, 4, 8, x[:, :8].copy(), 2, y[:, :4].copy())
    with pytest.raises(TypeError):
        ext.ternary_matmul(packed, n, kp)


def test_fallback_is_importable():
    """The package degrades to numpy when the extension is absent (checked in a fresh interpreter)."""
    import subprocess

    code = (
        "import sys, warnings; sys.modules['ternlm.kernels._kernels'] = None\n"
        "import numpy as np\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from ternlm import kernels as K, ternary as T\n"
        "assert any('numpy reference' in str(x.message) for x in w)\n"
        "x = np.ones((1, 300), np.float32); q = K.quantize_activations(x)\n"
        "p = T.pack(np.ones((4, 300), np.int8))\n"
        "assert (K.ternary_matmul_i32(p, q[0], q[2]) == 127 * 300).all()\n"
        "assert K.available_isas() == ['numpy']\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---- TQ1 layout (5 trits per byte) -------------------------------------------------------------------


def check_ternary_tq1(rng, m, n, k, w=None):
    if w is None:
        w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    packed = T.pack_tq1(w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    kp = T.padded_k_tq1(k)
    xq, a_scale, sums = K.quantize_activations(x, k_pad=kp)
    for got, want in zip((xq, a_scale, sums), T.quantize_activations(x, kp), strict=True):
        np.testing.assert_array_equal(got, want)
    acc = K.ternary_matmul_tq1_i32(packed, xq, sums)
    np.testing.assert_array_equal(acc, T.ternary_matmul_tq1_i32(packed, xq, sums))
    np.testing.assert_array_equal(acc, xq[:, :k].astype(np.int64) @ w.T.astype(np.int64))
    for w_scale in (float(rng.uniform(0.01, 2.0)), rng.uniform(0.01, 2.0, n).astype(np.float32)):
        y = K.ternary_matmul_tq1(packed, xq, a_scale, sums, w_scale)
        assert y.dtype == np.float32 and y.shape == (m, n)
        np.testing.assert_array_equal(y, T.ternary_matmul_tq1(packed, xq, a_scale, sums, w_scale))
        if isinstance(w_scale, float):  # the same values as the 2-bit layout
            xq2, a2, s2 = K.quantize_activations(x)
            np.testing.assert_array_equal(y, K.ternary_matmul(T.pack(w), xq2, a2, s2, w_scale))


def test_tq1_gemv_shapes(isa, threads):
    rng = np.random.default_rng(60 + threads)
    for n, k in [(1, 1), (3, 319), (4, 320), (7, 321), (64, 2560), (301, 2999), (257, 1000), (9, 6912)]:
        check_ternary_tq1(rng, 1, n, k)


def test_tq1_gemm_shapes(isa, threads):
    rng = np.random.default_rng(70 + threads)
    for m in (2, 3, 5):
        check_ternary_tq1(rng, m, int(rng.integers(1, 40)), int(rng.integers(1, 1500)))
    for _ in range(4):
        check_ternary_tq1(rng, int(rng.integers(2, 71)), int(rng.integers(1, 301)), int(rng.integers(1, 3001)))
    check_ternary_tq1(rng, 70, 130, 3000)


def test_tq1_every_byte_and_extremes(isa):
    """All 243 trit patterns, and the largest accumulators (long rows cross the GEMV's flush interval)."""
    import itertools

    pats = np.array(list(itertools.product((-1, 0, 1), repeat=5)), np.int8)  # (243, 5)
    w = np.zeros((243, 320), np.int8)
    w[:, ::64] = pats
    check_ternary_tq1(np.random.default_rng(80), 3, 243, 320, w)
    k = 320 * 1100
    w = np.ones((6, k), np.int8)
    w[1::2] = -1
    packed = T.pack_tq1(w)
    for m in (1, 2):
        xq = np.full((m, k), 127, np.int8)
        xq[-1] = -128 if m == 2 else 127
        sums = xq.sum(axis=1, dtype=np.int32)
        want = xq.astype(np.int64) @ w.T.astype(np.int64)
        np.testing.assert_array_equal(K.ternary_matmul_tq1_i32(packed, xq, sums), want)


def test_tq1_pack_roundtrip_and_format():
    rng = np.random.default_rng(81)
    w = rng.integers(-1, 2, size=(5, 700)).astype(np.int8)
    packed = T.pack_tq1(w)
    assert packed.shape == (5, 960 // 5) and packed.dtype == np.uint8
    np.testing.assert_array_equal(T.unpack_tq1(packed, 700), w)
    # byte j of block b: v = sum_i c[320b + 64i + j] 3^(4-i), q = ceil(256 v / 243)
    c = np.ones((5, 960), np.int64)
    c[:, :700] = w + 1
    v = sum(c[:, 320 + 64 * i + 7] * 3 ** (4 - i) for i in range(5))
    np.testing.assert_array_equal(packed[:, 64 + 7], -(-v * 256 // 243))
    with pytest.raises(ShapeError):
        T.pack_tq1(np.full((2, 3), 2, np.int8))
    with pytest.raises(ShapeError):
        T.unpack_tq1(packed, 961)


def test_tq1_bad_inputs():
    rng = np.random.default_rng(82)
    w = rng.integers(-1, 2, size=(12, 300)).astype(np.int8)
    packed = T.pack_tq1(w)
    xq, a_scale, sums = K.quantize_activations(rng.standard_normal((2, 300)).astype(np.float32), k_pad=320)
    xq2, _, _ = K.quantize_activations(rng.standard_normal((2, 300)).astype(np.float32))  # 2-bit k_pad 512
    cases = [
        (packed.view(np.int8), xq, a_scale, sums),
        (packed, xq2, a_scale, sums),  # activations padded for the 2-bit layout
        (T.pack(w), xq, a_scale, sums),  # 2-bit weights
        (packed[::2], xq, a_scale, sums),
        (packed, xq, a_scale[:1], sums),
        (packed, xq, a_scale, sums.astype(np.int64)),
        (packed[0], xq, a_scale, sums),
    ]
    for args in cases:
        with pytest.raises(ShapeError):
            K.ternary_matmul_tq1(*args, 1.0)
    with pytest.raises(ShapeError):
        K.ternary_matmul_tq1(packed, xq, a_scale, sums, np.ones(11, np.float32))
    with pytest.raises(ShapeError):
        K.ternary_matmul_tq1_i32(packed, xq, sums, out=np.empty((2, 12), np.float32))
    for kp in (256 + 32, 200):  # not a multiple of 64, or below k
        with pytest.raises(ShapeError):
            K.quantize_activations(np.ones((2, 300), np.float32), k_pad=kp)
    with pytest.raises(ShapeError):
        T.quantize_activations(np.ones((2, 300), np.float32), k_pad=200)
    if K._ext is not None:
        ext, y = K._ext, np.empty((2, 12), np.float32)
        with pytest.raises(ShapeError):  # k_pad not a multiple of 320
            ext.ternary_matmul_tq1(packed, 12, 256, xq, sums, a_scale, 1.0, 2, y, None)
        with pytest.raises(ShapeError):  # n larger than packed holds
            ext.ternary_matmul_tq1(packed, 13, 320, xq, sums, a_scale, 1.0, 2, y, None)
        with pytest.raises(ShapeError):
            ext.ternary_matmul_tq1(packed, 12, 320, xq, sums, a_scale, 1.0, 2, y, y)
        with pytest.raises(KernelError):  # k_pad above the documented bound
            big = 320 * (2**22 // 320 + 1)
            ext.ternary_matmul_tq1(np.empty(big // 5, np.uint8), 1, big, np.empty(big, np.int8), sums[:1],
                                   a_scale[:1], 1.0, 1, y[:1, :1].copy(), None)
