"""Evaluate alternative ternary weight formats/kernels against ternlm's 2-bit VNNI kernel.

    python benchmarks/lut_eval.py [--layers 30] [--rounds 7] [--gemm-m 128] [--threads 1,2] [--skip-verify]

Compiles ``benchmarks/lut_eval.c`` with ``gcc -O3 -march=native`` into a temporary shared library (ctypes)
and compares, on BitNet b1.58 2B4T shapes (per layer: qkv 3840x2560, o 2560x2560, gate|up 13824x2560,
down 2560x6912):

* ``i2``    ternlm's 2-bit layout and kernels (a copy of src/ternlm/kernels/avx512.c: shift/and + vpdpbusd),
* ``i2p``   the same 2-bit weights, GEMM by decoding a 4-row int8 panel once per 64 tokens,
* ``tq1``   1.6 bits/weight, 5 trits per byte as in llama.cpp TQ1_0 (q = ceil(256 v / 243)); GEMV without
            explicit trits via 3 t_i = 256 d_i + t_(i+1) (two vpdpbusd per trit vector), GEMM via a decoded panel,
* ``lut``   T-MAC/TL2-style lookup: per token int16 tables of the 27 sums of 3 activations, looked up with
            vpermw from 5-bit pattern indices (three per uint16: 1.78 bits/weight), rows in 64-row tiles,
* ``ternlm`` ternlm's own ``kernels.ternary_matmul_i32`` called from Python (sanity check of the copy).

First every kernel is checked against an exact numpy reference (random ternary weights, int8 activations,
GEMV and a small GEMM). Then, in one process and interleaved round by round so that the shared host's noise
hits all variants alike: decode GEMV over ``--layers`` layers of distinct weights (one token reads every
weight once from DRAM), reported as GB/s of packed weights and ms per token (ternary layers only, no head
or attention), at each thread count; and prefill GEMM of one layer at m = ``--gemm-m`` tokens, reported as
int8-equivalent GOPS (2 * n * k * m / s with the true k). All figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np

from ternlm import kernels as K
from ternlm import ternary as T

HERE = os.path.dirname(os.path.abspath(__file__))
LAYER = {"qkv": (3840, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912)}
VARIANTS = {"i2": 0, "i2p": 1, "tq1": 2, "lut": 3}
KPAD = {"i2": 256, "i2p": 256, "tq1": 320, "lut": 9}  # K padding granularity of each layout


class LtMat(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("kp", ctypes.c_int64),
        ("x", ctypes.c_void_p),
        ("sums", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("lut", ctypes.c_void_p),
    ]


def build(tmpdir: str) -> ctypes.CDLL:
    so = os.path.join(tmpdir, "lut_eval.so")
    cmd = ["gcc", "-O3", "-march=native", "-shared", "-fPIC", "-o", so, os.path.join(HERE, "lut_eval.c"), "-lpthread"]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(so)
    lib.lt_run.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(LtMat), ctypes.c_int, ctypes.c_int64,
                           ctypes.c_int, ctypes.POINTER(ctypes.c_double)]  # fmt: skip
    lib.lt_run.restype = ctypes.c_int
    return lib


def kpad(fmt: str, k: int) -> int:
    g = KPAD[fmt]
    return -(-k // g) * g


# ---- packers (codes c = w + 1, padding c = 1) ---------------------------------------------------------


def padded_codes(codes: np.ndarray, kp: int) -> np.ndarray:
    full = np.ones((codes.shape[0], kp), np.uint8)
    full[:, : codes.shape[1]] = codes
    return full


def pack_tq1(codes: np.ndarray) -> np.ndarray:
    """uint8 (n, kp/5): 64-byte chunk = 320 columns; byte j = ceil(256 v / 243), v = sum_i c[64i + j] 3^(4-i)."""
    n = codes.shape[0]
    kp = kpad("tq1", codes.shape[1])
    c = padded_codes(codes, kp).reshape(n, kp // 320, 5, 64).astype(np.int32)
    v = c[:, :, 0] * 81 + c[:, :, 1] * 27 + c[:, :, 2] * 9 + c[:, :, 3] * 3 + c[:, :, 4]
    return ((v * 256 + 242) // 243).astype(np.uint8).reshape(n, kp // 5)


def pack_lut(codes: np.ndarray) -> np.ndarray:
    """uint16 (n/64, kp/9, 64) as bytes: word u of row r = p(3u) | p(3u+1) << 5 | p(3u+2) << 10, p = c0 + 3c1 + 9c2."""
    n = codes.shape[0]
    kp = kpad("lut", codes.shape[1])
    c = padded_codes(codes, kp).reshape(n, kp // 9, 3, 3).astype(np.uint16)
    p = c[..., 0] + 3 * c[..., 1] + 9 * c[..., 2]  # (n, U, 3)
    word = p[..., 0] | (p[..., 1] << 5) | (p[..., 2] << 10)  # (n, U)
    tiles = word.reshape(n // 64, 64, kp // 9).transpose(0, 2, 1)
    return np.ascontiguousarray(tiles).view(np.uint8).reshape(n, -1)


def pack(fmt: str, codes: np.ndarray) -> np.ndarray:
    if fmt in ("i2", "i2p"):
        return T.pack_codes(codes)
    return pack_tq1(codes) if fmt == "tq1" else pack_lut(codes)


def random_packed(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of the right size (speed does not depend on values; every byte decodes to something)."""
    kp = kpad(fmt, k)
    nbytes = {"i2": kp // 4, "i2p": kp // 4, "tq1": kp // 5, "lut": kp // 9 * 2}[fmt]
    return rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)


# ---- running ---------------------------------------------------------------------------------------


class Job:
    """The lt_mat array for one variant over a list of (packed, n, k), with m tokens of activations."""

    def __init__(self, fmt: str, mats: list[tuple[np.ndarray, int, int]], xs: dict[int, np.ndarray], m: int):
        self.fmt, self.m, self.keep, self.arr_src = fmt, m, [], mats
        self.arr = (LtMat * len(mats))()
        self.ys = []
        lut_elems = max(m * (kpad(fmt, k) // 3) * 32 for _, _, k in mats) if fmt == "lut" else 0
        lut = aligned_empty(lut_elems * 2) if lut_elems else None
        for j, (w, n, k) in enumerate(mats):
            kp = kpad(fmt, k)
            x = np.zeros((m, kp), np.int8)
            x[:, :k] = xs[k][:m]
            sums = x.sum(axis=1, dtype=np.int32)
            y = np.zeros((m, n), np.int32)
            self.keep += [w, x, sums, y]
            self.ys.append(y)
            self.arr[j] = LtMat(w.ctypes.data, n, kp, x.ctypes.data, sums.ctypes.data, y.ctypes.data,
                                lut.ctypes.data if lut is not None else None)  # fmt: skip
        self.keep.append(lut)

    def run(self, lib: ctypes.CDLL, threads: int, reps: int) -> list[float]:
        times = (ctypes.c_double * reps)()
        rc = lib.lt_run(VARIANTS[self.fmt], threads, self.arr, len(self.arr), self.m, reps, times)
        if rc != 0:
            raise RuntimeError(f"lt_run({self.fmt}) failed: {rc}")
        return list(times)


def aligned_empty(nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off : off + nbytes]


def verify(lib: ctypes.CDLL, rng: np.random.Generator) -> None:
    shapes = [*LAYER.values(), (64, 100), (128, 9 * 7 + 1)]
    for n, k in shapes:
        w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        codes = (w + 1).astype(np.uint8)
        for m in (1, 8):
            xs = {k: rng.integers(-128, 128, size=(m, k), dtype=np.int8)}
            ref = xs[k].astype(np.float64) @ w.T.astype(np.float64)  # exact: |sums| << 2^53
            for fmt in VARIANTS:
                job = Job(fmt, [(pack(fmt, codes), n, k)], xs, m)
                for threads in (1, 2):
                    job.ys[0][...] = 0
                    job.run(lib, threads, 1)
                    if not np.array_equal(job.ys[0], ref.astype(np.int32)):
                        bad = np.argwhere(job.ys[0] != ref.astype(np.int32))[:3].tolist()
                        raise AssertionError(f"{fmt} n={n} k={k} m={m} {threads}T mismatch at {bad}")
            xq = np.zeros((m, T.padded_k(k)), np.int8)
            xq[:, :k] = xs[k]
            got = K.ternary_matmul_i32(T.pack(w), xq, xq.sum(axis=1, dtype=np.int32))
            if not np.array_equal(got, ref.astype(np.int32)):
                raise AssertionError(f"ternlm kernel n={n} k={k} m={m} mismatch")
    print(f"verify: all variants exact vs numpy on {len(shapes)} shapes, m = 1 and 8, 1 and 2 threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians over rounds x --reps")
    ap.add_argument("--reps", type=int, default=2, help="passes per C call")
    ap.add_argument("--gemm-m", type=int, default=128, help="prefill tokens (0: skip GEMM)")
    ap.add_argument("--gemm-rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--skip-verify", action="store_true")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)
        if not args.skip_verify:
            verify(lib, rng)

        fmts = ["i2", "tq1", "lut"]
        n_weights = args.layers * sum(n * k for n, k in LAYER.values())
        xs = {k: rng.integers(-128, 128, size=(max(args.gemm_m, 1), k), dtype=np.int8) for k in (2560, 6912)}
        weights = {f: [(random_packed(f, n, k, rng), n, k) for _ in range(args.layers) for n, k in LAYER.values()]
                   for f in fmts}  # fmt: skip
        nbytes = {f: sum(w.nbytes for w, _, _ in weights[f]) for f in fmts}
        gemv = {f: Job(f, weights[f], xs, 1) for f in fmts}
        # ternlm's own kernel on the i2 weights, one Python call per matrix
        tl_acts = {k: K.quantize_activations(rng.standard_normal((1, k)).astype(np.float32)) for k in (2560, 6912)}
        tl_out = {n: np.empty((1, n), np.int32) for n, _ in LAYER.values()}

        def tl_step() -> None:
            for w, n, k in weights["i2"]:
                xq, _, sums = tl_acts[k]
                K.ternary_matmul_i32(w, xq, sums, out=tl_out[n])

        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.layers} layers, "
              f"{n_weights / 1e9:.3f} G ternary weights")  # fmt: skip
        gemv_t: dict[tuple[str, int], list[float]] = {}
        for f in fmts:  # warm up: page in
            gemv[f].run(lib, 1, 1)
        for _ in range(args.rounds):
            for nt in threads:
                for f in fmts:
                    gemv_t.setdefault((f, nt), []).extend(gemv[f].run(lib, nt, args.reps))
                K.set_threads(nt)
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    tl_step()
                    gemv_t.setdefault(("ternlm", nt), []).append(time.perf_counter() - t0)
        bw = {}
        for nt in threads:
            K.set_threads(nt)
            bw[nt] = K.read_bandwidth()

        gemm_t: dict[tuple[str, int], list[float]] = {}
        # GEMV over one 512x2560 matrix 40 times (fits in L2): the compute ceiling
        l2_t: dict[tuple[str, int], list[float]] = {}
        gfmts = ["i2", "i2p", "tq1", "lut"]
        if args.gemm_m:
            m = args.gemm_m
            one = {f: [(random_packed(f, n, k, rng), n, k) for n, k in LAYER.values()] for f in gfmts}
            gemm = {f: Job(f, one[f], xs, m) for f in gfmts}
            l2 = {f: Job(f, [(random_packed(f, 512, 2560, rng), 512, 2560)] * 40, xs, 1) for f in fmts}
            for _ in range(args.gemm_rounds):
                for nt in threads:
                    for f in gfmts:
                        gemm_t.setdefault((f, nt), []).extend(gemm[f].run(lib, nt, 1))
                    for f in fmts:
                        l2[f].run(lib, nt, 5)  # warm the cache
                        l2_t.setdefault((f, nt), []).extend(l2[f].run(lib, nt, 20))
            ops = sum(2 * n * k * m for n, k in LAYER.values())
        K.set_threads(K.default_threads())

    bws = ", ".join(f"{nt}T {bw[nt] / 1e9:.1f} GB/s" for nt in threads)
    print(f"read bandwidth (1 GiB one pass, best of 3): {bws}")
    head = f"{'variant':<8} {'bits/w':>6} {'MB/token':>8}"
    for nt in threads:
        head += f" | {nt}T GB/s  ms/tok  tok/s"
    if args.gemm_m:
        head += " | GEMM m=" + str(args.gemm_m) + " GOPS " + "/".join(f"{nt}T" for nt in threads)
    print(head)
    for f in ["ternlm", *gfmts]:
        src = "i2" if f in ("ternlm", "i2p") else f
        line = f"{f:<8} {8 * nbytes[src] / n_weights:6.3f} {nbytes[src] / 1e6:8.1f}"
        for nt in threads:
            if f == "i2p":
                line += f" | {'(= i2)':>22}"
                continue
            t = statistics.median(gemv_t[(f, nt)])
            line += f" | {nbytes[src] / t / 1e9:7.1f} {t * 1e3:7.2f} {1 / t:6.1f}"
        if args.gemm_m and f != "ternlm":
            line += " | " + " / ".join(f"{ops / statistics.median(gemm_t[(f, nt)]) / 1e9:6.1f}" for nt in threads)
        print(line)
    if l2_t:
        print("GEMV compute ceiling: a 512x2560 matrix resident in L2, 40 calls; GB/s of packed weights, G weights/s:")
        for f in fmts:
            lb = sum(w.nbytes for w, _, _ in l2[f].arr_src)
            rates = []
            for nt in threads:
                t = statistics.median(l2_t[(f, nt)])
                rates.append(f"{nt}T {lb / t / 1e9:5.1f} GB/s {40 * 512 * 2560 / t / 1e9:5.1f} Gw/s")
            print(f"  {f:<6} ({lb / 40 / 1e3:4.0f} KB)  " + "  ".join(rates))


if __name__ == "__main__":
    main()
