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
    "available_isas",
    "default_threads",
    "float_matmul",
    "get_threads",
    "quantize_activations",
    "set_isa",
    "set_threads",
    "ternary_matmul",
    "ternary_matmul_i32",
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


def _check_out(out: np.ndarray, shape: tuple[int, int], dtype: np.dtype) -> None:
    if getattr(out, "shape", None) != shape or getattr(out, "dtype", None) != dtype:
        raise ShapeError(
            f"out: expected {dtype} {shape}, got {getattr(out, 'dtype', type(out).__name__)} "
            f"{getattr(out, 'shape', '')}"
        )


def quantize_activations(
    x: np.ndarray, out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token int8 quantization of x float32 (m, k).

    Returns (xq int8 (m, k_pad), a_scale float32 (m,), sums int32 (m,)), written into ``out`` if given.
    """
    m, k = _shape2(x, "x")
    k_pad = -(-k // _ref.BLOCK) * _ref.BLOCK
    if _ext is None:
        xq, a_scale, sums = _ref.quantize_activations(x)
        if out is None:
            return xq, a_scale, sums
        out[0][...], out[1][...], out[2][...] = xq, a_scale, sums
        return out
    if out is None:
        out = (np.empty((m, k_pad), np.int8), np.empty(m, _F32), np.empty(m, _I32))
    _ext.quantize(x, out[0], out[1], out[2], m, k, k_pad)
    return out


def _matmul_sizes(packed: np.ndarray, xq: np.ndarray) -> tuple[int, int, int]:
    n, kq = _shape2(packed, "packed")
    m, k_pad = _shape2(xq, "xq")
    if kq * 4 != k_pad:
        raise ShapeError(f"k_pad mismatch: packed {packed.shape} holds k_pad = {kq * 4}, xq {xq.shape}")
    return n, m, k_pad


def ternary_matmul(
    packed: np.ndarray,
    xq: np.ndarray,
    a_scale: np.ndarray,
    sums: np.ndarray,
    w_scale: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """y float32 (m, n) = (xq (m, k_pad) · unpack(packed (n, k_pad/4))ᵀ) * (w_scale / a_scale[i])."""
    n, m, k_pad = _matmul_sizes(packed, xq)
    if out is None:
        out = np.empty((m, n), _F32)
    else:
        _check_out(out, (m, n), _F32)
    if _ext is None:
        out[...] = _ref.ternary_matmul(packed, xq, a_scale, sums, w_scale)
    else:
        _ext.ternary_matmul(packed, n, k_pad, xq, sums, a_scale, w_scale, m, out, None)
    return out


def ternary_matmul_i32(
    packed: np.ndarray, xq: np.ndarray, sums: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The exact int32 accumulator (m, n) = Σ_j w[r, j] · xq[i, j] (sums must be the row sums of xq)."""
    n, m, k_pad = _matmul_sizes(packed, xq)
    if out is None:
        out = np.empty((m, n), _I32)
    else:
        _check_out(out, (m, n), _I32)
    if _ext is None:
        out[...] = _ref.ternary_matmul_i32(packed, xq, sums)
    else:
        # a_scale is unused for the raw accumulator; sums doubles as a buffer of the right length
        _ext.ternary_matmul(packed, n, k_pad, xq, sums, np.ones(m, _F32), 1.0, m, None, out)
    return out


def float_matmul(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
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
    if out is None:
        out = np.empty((m, n), _F32)
    else:
        _check_out(out, (m, n), _F32)
    if _ext is None:
        out[...] = _ref.float_matmul(w, x)
    else:
        _ext.float_matmul(w, code, n, k, x, m, out)
    return out


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
