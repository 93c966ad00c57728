"""Per-call time of Sampler.sample on a 128,256-token vocab (BitNet 2B4T), for the settings a server sees.

A continuous-batching server samples up to 16 sequences per decode step, so a millisecond here is 16 ms
per step. Each case samples from random-normal logits with a fresh Sampler holding a 512-token prompt, its
history growing as it draws; the median per-call time is reported.

    .venv/bin/python benchmarks/bench_sampling.py                      # this tree
    .venv/bin/python benchmarks/bench_sampling.py --baseline 7dea48e   # plus sampling.py at a git revision

A baseline's SamplingParams may lack some fields (frequency/presence penalties before they existed); they are
dropped for it and the case is marked with *.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ternlm import sampling

VOCAB = 128_256
PROMPT = 512
CASES: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "T0.8 top_k40 top_p0.95 min_p0.05": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
    "top_p 0.9 only": {"top_p": 0.9},
    "T0.8 top_p0.95 + penalties": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1,
                                   "frequency_penalty": 0.5, "presence_penalty": 0.5},
}


def load_revision(rev: str) -> types.ModuleType:
    """sampling.py as it was at a git revision, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/ternlm/sampling.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = sys.modules[f"sampling_{rev}"] = types.ModuleType(f"sampling_{rev}")  # dataclasses look it up
    exec(compile(source, f"{rev}:sampling.py", "exec"), module.__dict__)
    return module


def make_step(module: types.ModuleType, kwargs: dict, prompt: list[int]) -> tuple[Callable, bool]:
    """A sample(logits) closure for one fresh request, and whether some kwargs had to be dropped."""
    fields = {f.name for f in dataclasses.fields(module.SamplingParams)}
    params = module.SamplingParams(seed=0, **{k: v for k, v in kwargs.items() if k in fields})
    if "prompt_ids" in inspect.signature(module.Sampler).parameters:
        return module.Sampler(params, prompt).sample, not kwargs.keys() <= fields
    sampler, history = module.Sampler(params), list(prompt)  # the API before Sampler kept its history

    def step(logits: np.ndarray) -> tuple[int, float]:
        token, logprob = sampler.sample(logits, history)
        history.append(token)
        return token, logprob

    return step, not kwargs.keys() <= fields


def time_case(module: types.ModuleType, kwargs: dict, logits: np.ndarray, prompt: list[int],
              budget_s: float) -> tuple[float, bool]:
    """Median seconds per call over at most 300 calls or budget_s, after 3 warm-up calls."""
    step, dropped = make_step(module, kwargs, prompt)
    for _ in range(3):
        step(logits)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 300 and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        step(logits)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="git revision whose sampling.py to time alongside this tree's")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per case and implementation")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=VOCAB).astype(np.float32)
    prompt = rng.integers(0, VOCAB, size=PROMPT).tolist()
    impls = {"now": sampling}
    if args.baseline:
        impls = {args.baseline: load_revision(args.baseline), **impls}
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}, vocab {VOCAB}, prompt {PROMPT} tokens")
    header = f"{'case':36s}" + "".join(f"{name + ' µs':>14s}" for name in impls)
    print(header + ("     speedup" if args.baseline else ""))
    for case, kwargs in CASES.items():
        results = {name: time_case(m, kwargs, logits, prompt, args.budget) for name, m in impls.items()}
        row = f"{case:36s}" + "".join(f"{t * 1e6:13.0f}{'*' if dropped else ' '}" for t, dropped in results.values())
        if args.baseline:
            row += f"{results[args.baseline][0] / results['now'][0]:11.1f}x"
        print(row)


if __name__ == "__main__":
    main()
