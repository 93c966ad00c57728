"""Prefill and decode speed of ternlm on a model, with the memory bandwidth decode achieves.

    python benchmarks/make_2b4t_shapes.py            # once: a 2B4T-shaped random model
    python benchmarks/bench_decode.py [MODEL_DIR] [--threads 1 2] [--pp 128] [--tg 64] [--reps 3]

Bandwidth achieved = bytes of weights read per token (ternary layers + output head) x tokens/s.
Python overhead = the share of a decode step spent outside the C kernels (timed around each kernel call).
Medians of --reps runs; this machine is shared, so compare figures from one run only.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np

import ternlm
from ternlm import kernels
from ternlm.kvcache import KVCache


def bench(model: ternlm.Model, pp: int, tg: int) -> tuple[float, float]:
    """(prefill tok/s for pp tokens, decode tok/s for tg tokens after them)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, pp)
    cache = KVCache(model.config, pp + tg + 1)
    t0 = time.perf_counter()
    logits = model.transformer.forward(prompt, cache, 0, last_only=True)
    t1 = time.perf_counter()
    token = int(logits[0].argmax())
    for i in range(tg):
        token = int(model.transformer.forward(np.array([token]), cache, pp + i, last_only=True)[0].argmax())
    t2 = time.perf_counter()
    return pp / (t1 - t0), tg / (t2 - t1)


def kernel_share(model: ternlm.Model, steps: int = 16) -> float:
    """Fraction of decode time spent inside the C kernels."""
    spent = [0.0]

    def timed(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    names = [n for n in ("quantize_activations", "ternary_matmul", "float_matmul", "quantize_act_q8_0", "q8_matmul")
             if hasattr(kernels, n)]
    originals = {n: getattr(kernels, n) for n in names}
    cache = KVCache(model.config, 64 + steps)
    model.transformer.forward(np.arange(64) % model.config.vocab_size, cache, 0, last_only=True)
    try:
        for n in names:
            setattr(kernels, n, timed(originals[n]))
        t0 = time.perf_counter()
        for i in range(steps):
            model.transformer.forward(np.array([1]), cache, 64 + i, last_only=True)
        total = time.perf_counter() - t0
    finally:
        for n, fn in originals.items():
            setattr(kernels, n, fn)
    return spent[0] / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="bench-models/2b4t-random")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--head", default="q8_0", help="output head precision: q8_0 or float")
    args = ap.parse_args()

    model = ternlm.load(args.model, head=args.head)
    info = model.info()
    gb = info["bytes_per_token"] / 1e9
    print(f"model {args.model}: {info['layers']} layers, dim {info['dim']}, vocab {info['vocab']}, "
          f"head {info['head_dtype']}, load {model.load_seconds:.1f} s, isa {info['isa']}")
    print(f"bytes read per decoded token: {gb:.3f} GB (ternary {info['ternary_bytes'] / 1e9:.3f} "
          f"+ head {info['head_bytes'] / 1e9:.3f})")
    for threads in args.threads:
        kernels.set_threads(threads)
        bench(model, 8, 4)  # warm up: page in the weights
        runs = [bench(model, args.pp, args.tg) for _ in range(args.reps)]
        pp_rate = statistics.median(r[0] for r in runs)
        tg_rate = statistics.median(r[1] for r in runs)
        share = kernel_share(model)
        print(f"ternlm {threads}T: prefill pp{args.pp} {pp_rate:7.1f} tok/s | decode tg{args.tg} {tg_rate:6.1f} tok/s"
              f" = {tg_rate * gb:5.1f} GB/s of weights | python overhead {100 * (1 - share):4.1f}% of a decode step")


if __name__ == "__main__":
    main()
