"""Kernel throughput on BitNet b1.58 2B4T shapes, in hardware terms, at 1 and 2 threads.

    python benchmarks/bench_kernels.py [--layers 30] [--reps 5] [--gemm 128,512] [--no-f16] [--attention 80,160,512]

Decode: one token = per layer the four fused ternary GEMVs qkv 3840x2560, o 2560x2560, gate|up 13824x2560,
down 2560x6912 (one call each, per-row scales), then the 128256x2560 LM head in Q8_0 (and in Q4_0 and F16
for comparison). Printed as GB/s of weights read and as % of the DRAM bandwidth measured in the same run by
a one-pass read of a 1 GiB buffer on the same threads. Prefill: int8 GOPS of the fused GEMMs at m tokens.
Attention: one token's decode attention (20 query heads, 5 KV heads of 128) per layer at each position, over
--layers KV caches as ternlm.kvcache allocates them, as GB/s of keys and values read.
Every figure is the median of --reps runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from ternlm import kernels as K
from ternlm import ternary as T
from ternlm.config import ModelConfig
from ternlm.kvcache import KVCache
from ternlm.layers import Rope

# (n, k) of the four fused ternary matmuls of one 2B4T layer
LAYER = {"qkv": (3840, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912)}
HEAD = (128256, 2560)


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gemm", default="128,512", help="prefill token counts (empty: skip)")
    ap.add_argument("--no-f16", action="store_true", help="skip the F16 head")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--head-tokens", default="", help="Q8_0 head with this many tokens, e.g. 4,6,8,16 (batched "
                    "decode), under each ISA in --isa")
    ap.add_argument("--attention", default="", help="decode attention at these positions, e.g. 80,160,512")
    ap.add_argument("--isa", default=K.active_isa(), help="comma-separated ISAs for --head-tokens "
                    "(default: %(default)s)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Random bytes: the kernels' speed does not depend on the values.
    layers = [
        {name: rng.integers(0, 255, size=(n, T.padded_k(k) // 4), dtype=np.uint8) for name, (n, k) in LAYER.items()}
        for _ in range(args.layers)
    ]
    scales = {name: rng.uniform(0.5, 1.5, n).astype(np.float32) for name, (n, _) in LAYER.items()}
    tern_bytes = sum(w.nbytes for layer in layers for w in layer.values())
    hq = rng.integers(-127, 128, size=HEAD, dtype=np.int8)
    hd = rng.uniform(1e-3, 2e-3, size=(HEAD[0], HEAD[1] // 32)).astype(np.float16)
    q8_bytes = hq.nbytes + hd.nbytes
    hq4 = rng.integers(0, 256, size=(HEAD[0], HEAD[1] // 2), dtype=np.uint8)
    q4_bytes = hq4.nbytes + hd.nbytes
    hf16 = None if args.no_f16 else rng.standard_normal(HEAD, dtype=np.float32).astype(np.float16)
    probe = np.ones(1 << 30, np.uint8)
    acts = {k: K.quantize_activations(rng.standard_normal((1, k)).astype(np.float32)) for k in (2560, 6912)}
    outs = {name: np.empty((1, n), np.float32) for name, (n, _) in LAYER.items()}
    x_head = rng.standard_normal((1, HEAD[1])).astype(np.float32)
    hx = K.quantize_act_q8_0(x_head)
    y_head = np.empty((1, HEAD[0]), np.float32)
    print(f"{platform.processor() or platform.machine()}, ISA {K.active_isa()}, {args.layers} layers: "
          f"ternary {tern_bytes / 1e6:.0f} MB ({4 * args.layers} calls), head Q8_0 {q8_bytes / 1e6:.0f} MB, "
          f"Q4_0 {q4_bytes / 1e6:.0f} MB"
          + ("" if hf16 is None else f", F16 {hf16.nbytes / 1e6:.0f} MB"))  # fmt: skip

    def ternary_step() -> None:
        for layer in layers:
            for name, w in layer.items():
                xq, a_scale, sums = acts[LAYER[name][1]]
                K.ternary_matmul(w, xq, a_scale, sums, scales[name], out=outs[name])

    def q8_head() -> None:
        K.q8_matmul(hq, hd, hx[0], hx[1], out=y_head)

    def q4_head() -> None:
        K.q4_matmul(hq4, hd, hx[0], hx[1], out=y_head)

    def f16_head() -> None:
        K.float_matmul(hf16, x_head, out=y_head)

    def decode_step() -> None:
        ternary_step()
        q8_head()

    gemm_ms = [int(v) for v in args.gemm.split(",") if v]
    head_ms = [int(v) for v in args.head_tokens.split(",") if v]
    head_acts = {m: K.quantize_act_q8_0(rng.standard_normal((m, HEAD[1])).astype(np.float32)) for m in head_ms}
    gemm_acts = {
        m: {k: K.quantize_activations(rng.standard_normal((m, k)).astype(np.float32)) for k in (2560, 6912)}
        for m in gemm_ms
    }

    config = ModelConfig(arch="bitnet", dim=2560, n_layers=args.layers, n_heads=20, n_kv_heads=5, ffn_dim=6912,
                         vocab_size=HEAD[0], max_seq_len=4096)
    kv = KVCache(config, 4096)
    kv.k[...] = 0.01  # written once, as a filled context would be
    kv.v[...] = 0.01
    rope = Rope(config.head_dim, 500000.0, config.max_seq_len)
    attn_qkv = rng.standard_normal((1, config.q_dim + 2 * config.kv_dim)).astype(np.float32)

    for threads in [int(t) for t in args.threads.split(",")]:
        K.set_threads(threads)
        K._ext.read_probe(probe)
        bw = probe.nbytes / median_time(lambda: K._ext.read_probe(probe), args.reps)

        def report(label: str, fn, nbytes: int, threads: int = threads, bw: float = bw) -> None:
            fn()  # warm up the pool and page in the weights
            t = median_time(fn, args.reps)
            rate = nbytes / t
            print(f"  {threads}T {label:<28} {t * 1e3:7.2f} ms  {rate / 1e9:5.1f} GB/s  {100 * rate / bw:4.0f} %")

        print(f"{threads} thread(s): read probe {bw / 1e9:.1f} GB/s (1 GiB, one pass)")
        report("ternary layers", ternary_step, tern_bytes)
        report("head Q8_0", q8_head, q8_bytes)
        report("head Q4_0", q4_head, q4_bytes)
        if hf16 is not None:
            report("head F16", f16_head, hf16.nbytes)
        report("decode step (ternary + Q8_0)", decode_step, tern_bytes + q8_bytes)
        for m in gemm_ms:
            ops = sum(2 * m * n * k for n, k in LAYER.values())

            def gemm_layer(m: int = m) -> None:
                for name, w in layers[0].items():
                    xq, a_scale, sums = gemm_acts[m][LAYER[name][1]]
                    K.ternary_matmul(w, xq, a_scale, sums, scales[name])

            gemm_layer()
            t = median_time(gemm_layer, args.reps)
            print(f"  {threads}T GEMM m={m:<4} one layer       {t * 1e3:7.2f} ms  {ops / t / 1e9:6.0f} int8 GOPS "
                  f"({ops / 2 / t / 1e9 / threads:.0f} GMAC/s per thread)")  # fmt: skip
        for m in head_ms:
            def head_m(m: int = m) -> None:
                K.q8_matmul(hq, hd, *head_acts[m])

            times = []
            best = K.active_isa()
            for isa in args.isa.split(","):
                K.set_isa(isa)
                head_m()
                times.append(f"{isa} {median_time(head_m, args.reps) * 1e3:6.2f} ms")
            K.set_isa(best)
            print(f"  {threads}T head Q8_0 m={m:<3} " + ", ".join(times))
        for pos in [int(v) for v in args.attention.split(",") if v]:
            def attention(pos: int = pos) -> None:
                for i in range(args.layers):
                    K.attention_decode_batch(attn_qkv, [kv.k[i]], [kv.v[i]], [pos], rope.cos, rope.sin,
                                             config.n_heads, config.head_dim ** -0.5, [kv.scores])

            attention()
            t = median_time(attention, args.reps) / args.layers
            kv_bytes = 2 * (pos + 1) * config.kv_dim * kv.k.itemsize
            print(f"  {threads}T attention at position {pos:<5} {t * 1e6:7.1f} us per layer  "
                  f"{kv_bytes / t / 1e9:5.1f} GB/s of keys and values")
    K.set_threads(K.default_threads())


if __name__ == "__main__":
    main()
