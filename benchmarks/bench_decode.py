"""Prefill and decode speed of ternlm on a model, with the memory bandwidth decode achieves.

    python benchmarks/make_2b4t_shapes.py            # once: a 2B4T-shaped random model
    python benchmarks/bench_decode.py [MODEL_DIR] [--threads 1 2] [--pp 128] [--tg 64] [--reps 3] [--isa avx512vnni amx]

Bandwidth achieved = bytes read per token x tokens/s, printed against a read bandwidth measured in the same run
(ternlm.kernels.read_bandwidth). The bytes are the weights (ternary layers + output head) and the KV cache that
attention reads, on average over the decoded tokens; the share of the weights alone is printed too.
Python overhead: the share of a decode step that is Python, measured two ways (see python_overhead), and the
step's time by kernel.
Medians of --reps runs; this machine is shared, so compare figures from one run only.
"""

from __future__ import annotations

import argparse
import collections
import functools
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import ternlm
from ternlm import kernels
from ternlm.kvcache import KVCache


def bench_batch(model: ternlm.Model, batch: int, tg: int, prompt: int = 32) -> float:
    """Aggregate decode tok/s of `batch` sequences stepped together with decode_batch."""
    t = model.transformer
    caches = [KVCache(model.config, prompt + tg + 1) for _ in range(batch)]
    for j, cache in enumerate(caches):
        t.forward((np.arange(prompt) + j) % model.config.vocab_size, cache, 0, last_only=True)
    tokens = np.ones(batch, dtype=np.int64)
    t0 = time.perf_counter()
    for i in range(tg):
        tokens = t.decode_batch(tokens, caches, [prompt + i] * batch).argmax(axis=-1)
    return batch * tg / (time.perf_counter() - t0)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def huge_page_bytes() -> int:
    """Bytes of this process mapped with 2 MiB pages: weights on 4 KiB pages decode 10-15 % slower."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("AnonHugePages", "FilePmdMapped"))


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


KERNELS = ("quantize_activations", "ternary_matmul", "ternary_matmul_tq1", "float_matmul", "quantize_act_q8_0",
           "q8_matmul", "q4_matmul", "rmsnorm", "glu", "attention_decode", "attention_decode_batch")


def _key(fn: Callable, args: tuple) -> tuple:
    """A kernel call's name and the shapes of its first two arguments (lists of arrays: their shapes)."""
    def shape(a: object) -> object:
        return tuple(shape(x) for x in a) if isinstance(a, list) else getattr(a, "shape", a)
    return (fn.__name__, *(shape(a) for a in args[:2]))


def python_overhead(model: ternlm.Model, steps: int = 16) -> tuple[float, float, float, dict[str, float]]:
    """Share of a decode step that is Python: (python alone, wall time outside the C kernels), then the step's
    seconds and each kernel's seconds in it.

    "Python alone": the step re-run with every kernel replaced by a stub returning its earlier result.
    "Outside kernels": the real step with each kernel call timed; it also counts the cache and pipeline
    cost of switching between Python and the kernels.
    """
    cache = KVCache(model.config, 64 + steps)
    forward = model.transformer.forward
    forward(np.arange(64) % model.config.vocab_size, cache, 0, last_only=True)

    def step_time() -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            forward(np.array([1]), cache, 64 + i, last_only=True)
        return (time.perf_counter() - t0) / steps

    originals = {n: getattr(kernels, n) for n in KERNELS}
    spent = [0.0]
    by_kernel: dict[str, float] = collections.defaultdict(float)
    results: dict = {}

    def timed(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                results[_key(fn, args)] = out
                return out
            finally:
                dt = time.perf_counter() - t0
                spent[0] += dt
                by_kernel[fn.__name__] += dt
        return wrapper

    def stub(fn: Callable) -> Callable:
        return lambda *args, **kwargs: results[_key(fn, args)]

    try:
        for n, fn in originals.items():
            setattr(kernels, n, timed(fn))
        total = step_time()
        outside = 1 - spent[0] / (total * steps)
        for n, fn in originals.items():
            setattr(kernels, n, stub(fn))
        alone = step_time() / total
    finally:
        for n, fn in originals.items():
            setattr(kernels, n, fn)
    return alone, outside, total, {n: t / steps for n, t in by_kernel.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="bench-models/2b4t-random")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--head", default="q8_0", help="output head precision: q8_0, q4_0 or float")
    ap.add_argument("--weights", default="i2", choices=["i2", "tq1"],
                    help="ternary weight layout: i2 (2 bits/weight) or tq1 (1.6 bits/weight)")
    ap.add_argument("--isa", nargs="+", default=[kernels.active_isa()],
                    help="kernel ISAs to measure in turn (default: the best this CPU has; see kernels.available_isas)")
    ap.add_argument("--read-ahead", nargs="+", default=["on"], choices=["on", "off"],
                    help="measure with and/or without a worker reading the next weights ahead between kernels")
    ap.add_argument("--batch", type=int, nargs="*", default=[],
                    help="also measure decode_batch with these numbers of sequences (aggregate tok/s)")
    args = ap.parse_args()

    rss_before = resident_bytes()
    model = ternlm.load(args.model, head=args.head, weights=args.weights)
    rss_after = resident_bytes() - rss_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    info = model.info()
    gb = info["bytes_per_token"] / 1e9
    print(f"model {args.model}: {info['layers']} layers, dim {info['dim']}, vocab {info['vocab']}, "
          f"head {info['head_dtype']}, weights {info['ternary_layout']}, load {model.load_seconds:.1f} s, "
          f"isa {info['isa']}")
    print(f"bytes read per decoded token: {gb:.3f} GB (ternary {info['ternary_bytes'] / 1e9:.3f} "
          f"+ head {info['head_bytes'] / 1e9:.3f})")
    kv = model._cache.nbytes
    weights = info["bytes_per_token"]
    print(f"memory: resident after load {rss_after / 1e9:.3f} GB = {rss_after / weights:.2f} x weights; "
          f"peak during load {peak / 1e9:.3f} GB = {peak / (weights + kv):.2f} x (weights + "
          f"{kv / 1e9:.3f} GB KV cache allocated)")
    linked = {id(m): m.read_next for m in model.transformer.w.streamed()}
    for isa in args.isa:
        kernels.set_isa(isa)
        for threads in args.threads:
            for read_ahead in args.read_ahead:
                for m in model.transformer.w.streamed():
                    m.read_next = linked[id(m)] if read_ahead == "on" else None
                measure(model, args, f"{isa}{'' if read_ahead == 'on' else ' no-read-ahead'}", threads, gb)
    kernels.set_isa(kernels.available_isas()[-1])
    # A model stored in ternlm's own layout is mapped, not read, at load: its pages count once decode touched them.
    rss_end = resident_bytes() - rss_before
    print(f"memory: resident after the runs (every weight read, their KV caches freed) {rss_end / 1e9:.3f} GB "
          f"= {rss_end / weights:.2f} x weights, {huge_page_bytes() / 1e9:.3f} GB of it on 2 MiB pages")


def kv_bytes_read(config: ternlm.ModelConfig, pp: int, tg: int) -> float:
    """Mean bytes of float32 keys and values that attention reads per decoded token: the token at position p
    reads p + 1 rows of every layer's cache."""
    row = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4
    return row * (pp + (tg + 1) / 2)


def measure(model: ternlm.Model, args: argparse.Namespace, isa: str, threads: int, gb: float) -> None:
    kernels.set_threads(threads)
    bench(model, 8, 4)  # warm up: page in the weights
    runs = [bench(model, args.pp, args.tg) for _ in range(args.reps)]
    pp_rate = statistics.median(r[0] for r in runs)
    tg_rate = statistics.median(r[1] for r in runs)
    alone, outside, step, parts = python_overhead(model)
    bw = kernels.read_bandwidth() / 1e9
    read = gb + kv_bytes_read(model.config, args.pp, args.tg) / 1e9
    print(f"ternlm {isa} {threads}T: prefill pp{args.pp} {pp_rate:7.1f} tok/s | decode tg{args.tg} {tg_rate:6.1f} "
          f"tok/s = {tg_rate * read:5.1f} GB/s, {100 * tg_rate * read / bw:.0f}% of the {bw:.1f} GB/s measured "
          f"(ceiling {bw / read:.1f} tok/s for {read:.3f} GB read per token; weights alone "
          f"{100 * tg_rate * gb / bw:.0f}%) | python {100 * alone:.1f}% of a decode step alone, "
          f"{100 * outside:.1f}% of wall time outside kernels")
    print(f"ternlm {isa} {threads}T: decode step {step * 1e3:.1f} ms (kernels timed): "
          + ", ".join(f"{n} {t * 1e3:.2f}" for n, t in sorted(parts.items(), key=lambda p: -p[1]))
          + f", outside kernels {(step - sum(parts.values())) * 1e3:.2f} ms")
    for b in args.batch:
        rate = statistics.median(bench_batch(model, b, args.tg) for _ in range(args.reps))
        print(f"ternlm {isa} {threads}T: batched decode of {b} sequences {rate:6.1f} tok/s in all "
              f"({rate / tg_rate:.2f} x one sequence)")


if __name__ == "__main__":
    main()
