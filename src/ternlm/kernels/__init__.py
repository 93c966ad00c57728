"""Fast ternary and float matmuls: the C extension (ISA picked at run time) with numpy fallbacks.

Arrays go in as they are: the right dtype, C-contiguous, or ShapeError. Nothing is copied, so a
decode step pays only a few microseconds of Python per call. If the extension is not built, every
function falls back to the numpy reference in ``ternlm.ternary`` (with a warning at import).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from ternlm import ternary as _ref
from ternlm.errors import KernelError, ShapeError

try:
    from ternlm.kernels import _kernels as _ext
except ImportError as exc:  # not built (e.g. a source checkout): stay usable, slowly
    _ext = None
    warnings.warn(
        f"ternlm C kernels are not available ({exc}); using the numpy reference (slow). "
        "Build them with `pip install -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _ext.set_exceptions(ShapeError, KernelError)

__all__ = [
    "active_isa",
    "attention_decode",
    "attention_decode_batch",
    "available_isas",
    "default_threads",
    "float_matmul",
    "get_threads",
    "glu",
    "q4_matmul",
    "q8_matmul",
    "quantize_act_q8_0",
    "quantize_activations",
    "read_bandwidth",
    "rmsnorm",
    "set_isa",
    "set_threads",
    "ternary_matmul",
    "ternary_matmul_i32",
    "ternary_matmul_tq1",
    "ternary_matmul_tq1_i32",
]

_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
# float weight dtype -> the C enum tl_dtype; uint16 arrays hold bfloat16 bits
_FLOAT_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.uint16): 2}
_fallback_threads = 1


def _shape2(a: object, name: str) -> tuple[int, int]:
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) != 2:
        raise ShapeError(f"{name}: expected a 2-D numpy array, got {getattr(a, 'shape', type(a).__name__)}")
    return shape


def _output(out: np.ndarray | None, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """`out` checked against the result's shape and dtype, or a new array for the result."""
    if out is None:
        return np.empty(shape, dtype)
    _check_out(out, shape, dtype)
    return out


def _check_out(out: np.ndarray, shape: tuple[int, int], dtype: np.dtype) -> None:
    if getattr(out, "shape", None) != shape or getattr(out, "dtype", None) != dtype:
        raise ShapeError(
            f"out: expected {dtype} {shape}, got {getattr(out, 'dtype', type(out).__name__)} "
            f"{getattr(out, 'shape', '')}"
        )


def quantize_activations(
    x: np.ndarray, out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, k_pad: int | None = None,
    norm: np.ndarray | None = None, eps: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token int8 quantization of x float32 (m, k), or with ``norm`` (k,) float32 of ``rmsnorm(x, norm, eps)``
    (the same bits as the two calls, without the normalized copy).

    Returns (xq int8 (m, k_pad), a_scale float32 (m,), sums int32 (m,)), written into ``out`` if given.
    k_pad: the zero-padded width, ``padded_k(k)`` (2-bit layout) by default; ``padded_k_tq1(k)`` for TQ1
    weights; any multiple of 64 that is at least k.
    """
    m, k = _shape2(x, "x")
    if k_pad is None:
        k_pad = -(-k // _ref.BLOCK) * _ref.BLOCK
    elif k_pad < k or k_pad % 64 != 0:
        raise ShapeError(f"k_pad = {k_pad} must be a multiple of 64 and at least k = {k}")
    if _ext is None:
        xq, a_scale, sums = _ref.quantize_activations(x if norm is None else _ref.rmsnorm(x, norm, eps), k_pad)
        if out is None:
            return xq, a_scale, sums
        out[0][...], out[1][...], out[2][...] = xq, a_scale, sums
        return out
    if out is None:
        out = (np.empty((m, k_pad), np.int8), np.empty(m, _F32), np.empty(m, _I32))
    if norm is None:
        _ext.quantize(x, out[0], out[1], out[2], m, k, k_pad)
    else:
        _ext.quantize(x, out[0], out[1], out[2], m, k, k_pad, norm, eps)
    return out


# Packed ternary layouts: codes per byte, the extension's kernel, the numpy references (float, int32).
_LAYOUTS = {
    "i2": (4, "ternary_matmul", _ref.ternary_matmul, _ref.ternary_matmul_i32),
    "tq1": (5, "ternary_matmul_tq1", _ref.ternary_matmul_tq1, _ref.ternary_matmul_tq1_i32),
}


def _ternary(layout: str, packed: np.ndarray, xq: np.ndarray, a_scale: np.ndarray | None, sums: np.ndarray,
             w_scale: float | np.ndarray | None, out: np.ndarray | None, next: np.ndarray | None = None) -> np.ndarray:
    """The float output (a_scale and w_scale given) or the exact int32 accumulator (both None)."""
    per_byte, ext_name, ref_float, ref_i32 = _LAYOUTS[layout]
    n, kq = _shape2(packed, "packed")
    m, k_pad = _shape2(xq, "xq")
    if kq * per_byte != k_pad:
        raise ShapeError(f"k_pad mismatch: {layout} packed {packed.shape} holds k_pad = {kq * per_byte}, "
                         f"xq {xq.shape}")
    if isinstance(w_scale, np.ndarray):
        if w_scale.shape != (n,) or w_scale.dtype != _F32:
            raise ShapeError(f"w_scale: expected float32 ({n},), got {w_scale.dtype} {w_scale.shape}")
    elif w_scale is not None:
        w_scale = float(w_scale)
    raw = a_scale is None
    out = _output(out, (m, n), _I32 if raw else _F32)
    if _ext is None:
        out[...] = ref_i32(packed, xq, sums) if raw else ref_float(packed, xq, a_scale, sums, w_scale)
    elif raw:  # a_scale is unused for the raw accumulator
        getattr(_ext, ext_name)(packed, n, k_pad, xq, sums, np.ones(m, _F32), 1.0, m, None, out)
    else:
        getattr(_ext, ext_name)(packed, n, k_pad, xq, sums, a_scale, w_scale, m, out, None, next)
    return out


def ternary_matmul(packed: np.ndarray, xq: np.ndarray, a_scale: np.ndarray, sums: np.ndarray,
                   w_scale: float | np.ndarray, out: np.ndarray | None = None,
                   next: np.ndarray | None = None) -> np.ndarray:
    """y float32 (m, n) = (xq (m, k_pad) · unpack(packed (n, k_pad/4))ᵀ) * (w_scale / a_scale[i]).

    ``w_scale`` is a float, or a float32 array (n,) of one scale per output row (fused projections).
    ``next``: the weights the next kernel call reads (any weight kernel's); with several threads a worker
    reads their tail ahead while the caller works between the two calls. Every weight kernel takes it.
    """
    return _ternary("i2", packed, xq, a_scale, sums, w_scale, out, next)


def ternary_matmul_i32(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray,
                       out: np.ndarray | None = None) -> np.ndarray:
    """The exact int32 accumulator (m, n) = Σ_j w[r, j] · xq[i, j] (sums must be the row sums of xq)."""
    return _ternary("i2", packed, xq, None, sums, None, out)


def ternary_matmul_tq1(packed: np.ndarray, xq: np.ndarray, a_scale: np.ndarray, sums: np.ndarray,
                       w_scale: float | np.ndarray, out: np.ndarray | None = None,
                       next: np.ndarray | None = None) -> np.ndarray:
    """``ternary_matmul`` for TQ1 weights (n, k_pad/5) (``ternary.pack_tq1``); xq (m, k_pad), k_pad % 320 == 0
    (``quantize_activations(x, k_pad=ternary.padded_k_tq1(k))``). Same output formula and scales."""
    return _ternary("tq1", packed, xq, a_scale, sums, w_scale, out, next)


def ternary_matmul_tq1_i32(packed: np.ndarray, xq: np.ndarray, sums: np.ndarray,
                           out: np.ndarray | None = None) -> np.ndarray:
    """The exact int32 accumulator (m, n) for TQ1 weights (see ``ternary_matmul_i32``)."""
    return _ternary("tq1", packed, xq, None, sums, None, out)


def quantize_act_q8_0(x: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 activations of x float32 (m, k), k a multiple of 32: (xq int8 (m, k), xd float32 (m, k // 32))."""
    m, k = _shape2(x, "x")
    if k % _ref.QBLOCK != 0:
        raise ShapeError(f"x: k = {k} is not a multiple of {_ref.QBLOCK}")
    if _ext is None:
        xq, xd = _ref.quantize_act_q8_0(x)
        if out is None:
            return xq, xd
        out[0][...], out[1][...] = xq, xd
        return out
    if out is None:
        out = (np.empty((m, k), np.int8), np.empty((m, k // _ref.QBLOCK), _F32))
    _ext.quantize_q8_0(x, out[0], out[1], m, k)
    return out


def q8_matmul(
    q: np.ndarray, d: np.ndarray, xq: np.ndarray, xd: np.ndarray, out: np.ndarray | None = None,
    next: np.ndarray | None = None,
) -> np.ndarray:
    """y float32 (m, n) from Q8_0 weights q int8 (n, k), d float16 (n, k // 32) and Q8_0 activations.

    Bit-identical to ``ternlm.ternary.q8_matmul`` on every ISA (a fixed float summation order).
    """
    n, k = _shape2(q, "q")
    m, kx = _shape2(xq, "xq")
    if kx != k:
        raise ShapeError(f"q {q.shape} and xq {xq.shape} disagree on k")
    out = _output(out, (m, n), _F32)
    if _ext is None:
        out[...] = _ref.q8_matmul(q, d, xq, xd)
    else:
        _ext.q8_matmul(q, d, n, k, xq, xd, m, out, next)
    return out


def q4_matmul(
    q4: np.ndarray, d: np.ndarray, xq: np.ndarray, xd: np.ndarray, out: np.ndarray | None = None,
    next: np.ndarray | None = None,
) -> np.ndarray:
    """y float32 (m, n) from Q4_0 weights q4 uint8 (n, k // 2), d float16 (n, k // 32) and Q8_0 activations.

    Bit-identical to ``ternlm.ternary.q4_matmul`` on every ISA (the float order of ``q8_matmul``).
    """
    n, half = _shape2(q4, "q4")
    m, k = _shape2(xq, "xq")
    if 2 * half != k:
        raise ShapeError(f"q4 {q4.shape} and xq {xq.shape} disagree on k (q4 holds k / 2 bytes per row)")
    out = _output(out, (m, n), _F32)
    if _ext is None:
        out[...] = _ref.q4_matmul(q4, d, xq, xd)
    else:
        _ext.q4_matmul(q4, d, n, k, xq, xd, m, out, next)
    return out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm of x float32 (m, k) with weight w (k,)."""
    m, k = _shape2(x, "x")
    if out is None:
        out = np.empty((m, k), _F32)
    if _ext is None:
        out[...] = _ref.rmsnorm(x, w, eps)
    else:
        _ext.rmsnorm(x, w, eps, m, k, out)
    return out


def glu(gu: np.ndarray, act: str) -> np.ndarray:
    """act(gate) * up (m, f) from gu float32 (m, 2f) = [gate | up]; act is "relu2" or "silu"."""
    m, f2 = _shape2(gu, "gu")
    if f2 % 2 or act not in _ref.ACTIVATIONS:
        raise ShapeError(f"glu: need an even width and an activation in {list(_ref.ACTIVATIONS)}, "
                         f"got {gu.shape} and {act!r}")
    if _ext is None:
        return _ref.glu(gu, act)
    out = np.empty((m, f2 // 2), _F32)
    _ext.glu(gu, m, f2 // 2, _ref.ACTIVATIONS[act], out)
    return out


def causal_softmax(x: np.ndarray, period: int, first: int, scale: float) -> np.ndarray:
    """Prefill attention's causal softmax, in place: row r of x float32 (rows, s) becomes softmax(scale * x)
    over its first ``first + r % period`` entries (a block of ``period`` queries, stacked per head, the first
    seeing ``first`` keys), 0 after them. One C call with the GIL released, so blocks run on several threads.
    """
    rows, s = _shape2(x, "x")
    if period <= 0 or first <= 0 or x.dtype != _F32:
        raise ShapeError(f"causal_softmax: needs float32 scores and a positive period and first, got {x.dtype}, "
                         f"{period} and {first}")
    if _ext is None:
        x[...] = _ref.causal_softmax(x, period, first, scale)
    else:  # the extension checks that x is C-contiguous and writable
        _ext.causal_softmax(x, rows, s, period, first, scale)
    return x


def attention_decode(qkv: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int, cos: np.ndarray,
                     sin: np.ndarray, n_heads: int, scale: float, scores: np.ndarray) -> np.ndarray:
    """One token's attention at `pos` (see ``ternlm.ternary.attention_decode``); writes k, v into the caches.

    qkv (n_heads*hd + 2*n_kv*hd,) float32; k_cache, v_cache (n_kv, max_len, hd); cos, sin (hd/2,);
    scores (n_heads, max_len) scratch. Returns (n_heads*hd,) float32.
    """
    if k_cache.ndim != 3 or v_cache.shape != k_cache.shape:
        raise ShapeError(f"attention_decode: caches must both be (n_kv, max_len, hd), got {k_cache.shape} "
                         f"and {v_cache.shape}")
    n_kv, max_len, hd = k_cache.shape
    if _ext is None:
        return _ref.attention_decode(qkv, k_cache, v_cache, pos, cos, sin, n_heads, scale)
    out = np.empty(n_heads * hd, _F32)
    _ext.attention_decode(qkv, k_cache, v_cache, max_len, pos, cos, sin, n_heads, n_kv, hd, scale, scores, out)
    return out


def attention_decode_batch(qkv: np.ndarray, k_caches: list[np.ndarray], v_caches: list[np.ndarray],
                           positions: list[int], cos: np.ndarray, sin: np.ndarray, n_heads: int, scale: float,
                           scores: list[np.ndarray]) -> np.ndarray:
    """``attention_decode`` for b sequences in one call, the same bits as b calls of it.

    qkv (b, n_heads*hd + 2*n_kv*hd) float32; k_caches[j], v_caches[j] (n_kv, max_len_j, hd) and
    scores[j] (n_heads, max_len_j) of sequence j, written at positions[j]; cos, sin the whole RoPE tables
    (rows, hd/2), row positions[j] used. Returns (b, n_heads*hd) float32.
    """
    if not len(k_caches) == len(v_caches) == len(positions) == len(scores) == len(qkv):
        raise ShapeError(f"attention_decode_batch: {len(qkv)} qkv rows, {len(k_caches)} k_caches, "
                         f"{len(v_caches)} v_caches, {len(positions)} positions and {len(scores)} scores "
                         "must be as many")
    if not k_caches:
        raise ShapeError("attention_decode_batch: need at least one sequence")
    n_kv, _, hd = k_caches[0].shape if k_caches[0].ndim == 3 else (0, 0, 0)
    for k, v in zip(k_caches, v_caches, strict=True):
        if k.ndim != 3 or v.shape != k.shape or k.shape[0] != n_kv or k.shape[2] != hd:
            raise ShapeError(f"attention_decode_batch: caches must all be (n_kv, max_len, hd), got {k.shape} "
                             f"and {v.shape}")
    if _ext is None:
        return np.stack([_ref.attention_decode(row, k, v, p, cos[p], sin[p], n_heads, scale)
                         for row, k, v, p in zip(qkv, k_caches, v_caches, positions, strict=True)])
    out = np.empty((len(qkv), n_heads * hd), _F32)
    _ext.attention_decode_batch(qkv, k_caches, v_caches, positions, cos, sin, scores, n_heads, n_kv, hd, scale, out)
    return out


def float_matmul(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None,
                 next: np.ndarray | None = None) -> np.ndarray:
    """y float32 (m, n) = x float32 (m, k) · wᵀ, f32 accumulation (the LM head).

    w (n, k) is float32, float16, or bfloat16 bits stored as uint16 (or an ml_dtypes bfloat16 array).
    """
    n, k = _shape2(w, "w")
    m, kx = _shape2(x, "x")
    if kx != k:
        raise ShapeError(f"w {w.shape} and x {x.shape} disagree on k")
    if w.dtype.name == "bfloat16":
        w = w.view(np.uint16)
    code = _FLOAT_DTYPES.get(w.dtype)
    if code is None:
        raise ShapeError(f"w: expected float32, float16 or uint16 (bfloat16 bits), got {w.dtype}")
    out = _output(out, (m, n), _F32)
    if _ext is None:
        out[...] = _ref.float_matmul(w, x)
    else:
        _ext.float_matmul(w, code, n, k, x, m, out, next)
    return out


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Memory read bandwidth in bytes/s with the current thread count: best of `reps` one-pass reads of a
    buffer (kept by the benchmarks beside their own figures: decode speed is bounded by it)."""
    import time

    buf = np.ones(nbytes // 4096 * 4096, np.uint8)
    read = _ext.read_probe if _ext is not None else np.sum
    best = float("inf")
    for _ in range(reps + 1):  # the first pass faults the pages in
        t0 = time.perf_counter()
        read(buf)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def default_threads() -> int:
    """TERNLM_THREADS if set, else the physical cores this process may run on (SMT siblings count once)."""
    env = os.environ.get("TERNLM_THREADS")
    if env:
        return max(1, int(env))
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_threads(n: int) -> None:
    """Threads per kernel call, the calling thread included."""
    global _fallback_threads
    if _ext is None:
        if n < 1:
            raise KernelError(f"thread count must be >= 1, got {n}")
        _fallback_threads = n
    else:
        _ext.set_threads(n)


def get_threads() -> int:
    return _fallback_threads if _ext is None else _ext.get_threads()


def available_isas() -> list[str]:
    """Kernel ISAs this CPU supports, best last ("numpy" when the extension is missing)."""
    return ["numpy"] if _ext is None else list(_ext.available_isas())


def set_isa(name: str) -> None:
    """Use this ISA's kernels from now on (for tests and benchmarks; the best is the default)."""
    if _ext is None:
        if name != "numpy":
            raise KernelError(f"unknown or unsupported ISA '{name}'")
    else:
        _ext.set_isa(name)


def active_isa() -> str:
    return "numpy" if _ext is None else _ext.active_isa()


if _ext is not None:
    _ext.set_threads(default_threads())
