"""Kernel throughput on BitNet b1.58 2B4T shapes: GEMV GB/s of packed weights, GEMM int8 GOPS, LM head GB/s.

    python benchmarks/bench_kernels.py [--layers 30] [--reps 5] [--head]

Every figure is the median of --reps runs; the numpy reference is timed in the same run for the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from ternlm import kernels as K
from ternlm import ternary as T

# (n, k) of the seven BitLinear weights of one 2B4T layer
LAYER = {"q": (2560, 2560), "k": (640, 2560), "v": (640, 2560), "o": (2560, 2560),
         "gate": (6912, 2560), "up": (6912, 2560), "down": (2560, 6912)}  # fmt: skip


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layers(n_layers: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    # Random bytes: the kernels' speed does not depend on the code values.
    return [
        {name: rng.integers(0, 255, size=(n, T.padded_k(k) // 4), dtype=np.uint8) for name, (n, k) in LAYER.items()}
        for _ in range(n_layers)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--head", action="store_true", help="also time the 128256x2560 bf16 LM head GEMV")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layers = make_layers(args.layers, rng)
    total_bytes = sum(w.nbytes for layer in layers for w in layer.values())
    acts = {k: K.quantize_activations(rng.standard_normal((1, k)).astype(np.float32)) for k in (2560, 6912)}
    outs = {name: np.empty((1, n), np.float32) for name, (n, _) in LAYER.items()}
    print(f"{platform.processor() or platform.machine()}, ISA {K.active_isa()}, "
          f"{args.layers} layers, {total_bytes / 1e6:.0f} MB packed")  # fmt: skip

    def gemv_all() -> None:
        for layer in layers:
            for name, w in layer.items():
                xq, a_scale, sums = acts[LAYER[name][1]]
                K.ternary_matmul(w, xq, a_scale, sums, 1.0, out=outs[name])

    def gemv_ref_one_layer() -> None:
        for name, w in layers[0].items():
            xq, a_scale, sums = acts[LAYER[name][1]]
            T.ternary_matmul(w, xq, a_scale, sums, 1.0)

    ref_t = median_time(gemv_ref_one_layer, 2) * args.layers
    m = 128
    gemm_acts = {k: K.quantize_activations(rng.standard_normal((m, k)).astype(np.float32)) for k in (2560, 6912)}
    ops = sum(2 * m * n * k for n, k in LAYER.values())

    def gemm_layer() -> None:
        for name, w in layers[0].items():
            xq, a_scale, sums = gemm_acts[LAYER[name][1]]
            K.ternary_matmul(w, xq, a_scale, sums, 1.0)

    def gemm_ref_layer() -> None:
        for name, w in layers[0].items():
            xq, a_scale, sums = gemm_acts[LAYER[name][1]]
            T.ternary_matmul(w, xq, a_scale, sums, 1.0)

    gemm_ref_t = median_time(gemm_ref_layer, 2)
    for threads in (1, 2):
        K.set_threads(threads)
        gemv_all()  # warm up the pool and page in the weights
        t = median_time(gemv_all, args.reps)
        print(f"GEMV m=1, {threads}T: {t * 1e3:7.2f} ms per token ({args.layers * 7} calls), "
              f"{total_bytes / t / 1e9:5.1f} GB/s; numpy ref {ref_t * 1e3:.0f} ms, ratio {ref_t / t:.0f}x")  # fmt: skip
        gemm_layer()
        t = median_time(gemm_layer, args.reps)
        print(f"GEMM m={m}, {threads}T: {t * 1e3:7.2f} ms per layer, {ops / t / 1e9:6.0f} int8 GOPS; "
              f"numpy ref {gemm_ref_t * 1e3:.0f} ms, ratio {gemm_ref_t / t:.0f}x")  # fmt: skip
    if args.head:
        head = rng.integers(0, 2**16, size=(128256, 2560), dtype=np.uint16) & np.uint16(0xBFFF)  # finite bf16
        x = rng.standard_normal((1, 2560)).astype(np.float32)
        out = np.empty((1, 128256), np.float32)
        for threads in (1, 2):
            K.set_threads(threads)
            K.float_matmul(head, x, out=out)
            t = median_time(lambda: K.float_matmul(head, x, out=out), args.reps)
            print(f"LM head bf16 GEMV, {threads}T: {t * 1e3:7.2f} ms, {head.nbytes / t / 1e9:5.1f} GB/s")
    K.set_threads(K.default_threads())


if __name__ == "__main__":
    main()
