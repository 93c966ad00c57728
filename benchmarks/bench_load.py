"""Load time and peak memory: a Hugging Face directory against ternlm's own .tlm file of the same model.

    python benchmarks/bench_load.py [MODEL_DIR] [--reps 3] [--head q8_0] [--weights i2]

MODEL_DIR defaults to bench-models/2b4t-random (made by benchmarks/make_2b4t_shapes.py when missing).
The directory is converted once to MODEL_DIR.tlm; every measurement then runs in a fresh Python process
(imports not timed) so that peak RSS (getrusage ru_maxrss of the child) belongs to that one load. Rows:
the directory with the cache off (every load converts), the .tlm file, and the directory through a warm
load cache (a private TERNLM_HOME). "first token" is one decode step after the load: a mapped file's pages
are faulted in there instead of during the load, but most of that step is the first touch of the model's
full-context KV cache (about 630 MB at 2B4T's 4096 positions), whatever the source. Files are in the page
cache (warm); medians of --reps runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
import numpy as np
import ternlm
path, head, weights, cache = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
model = ternlm.load(path, head=head, weights=weights, cache=cache)
t1 = time.perf_counter()
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.logits([1])
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "first": t2 - t1, "rss_load": rss_load * 1024,
                  "rss_first": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CONVERT = """
import sys, time
from ternlm.formats import open_model
from ternlm.formats.native import prepare, write_native
t0 = time.perf_counter()
write_native(prepare(open_model(sys.argv[1]), sys.argv[2], sys.argv[3]), sys.argv[4])
print(f"converted in {time.perf_counter() - t0:.1f} s")
"""


def child(args: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(label: str, args: list[str], reps: int, env: dict[str, str] | None = None) -> dict[str, float]:
    runs = [child(args, env) for _ in range(reps)]
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"  {label}: load {result['load']:.3f} s, peak RSS {result['rss_load'] / 2**20:.0f} MiB "
          f"(runs: {', '.join(format(r['load'], '.3f') for r in runs)} s)", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=ROOT / "bench-models" / "2b4t-random")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--head", default="q8_0", choices=("q8_0", "q4_0", "float"))
    ap.add_argument("--weights", default="i2", choices=("i2", "tq1"))
    a = ap.parse_args()
    if not a.model.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_2b4t_shapes.py"), str(a.model)], check=True)
    native = a.model.with_name(f"{a.model.name}-{a.head}-{a.weights}.tlm")
    if not native.exists():
        subprocess.run([sys.executable, "-c", CONVERT, str(a.model), a.head, a.weights, str(native)], check=True)
    hf_bytes = sum(f.stat().st_size for f in a.model.iterdir() if f.is_file())
    print(f"{a.model} ({hf_bytes / 2**20:.0f} MiB) and {native.name} ({native.stat().st_size / 2**20:.0f} MiB); "
          f"head {a.head}, weights {a.weights}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; medians of {a.reps}")

    opts = [a.head, a.weights]
    rows = {"HF directory, no cache": measure("HF", [str(a.model), *opts, "0"], a.reps),
            ".tlm file": measure("tlm", [str(native), *opts, "0"], a.reps)}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "TERNLM_HOME": home}
        t0 = time.perf_counter()
        child([str(a.model), *opts, "1"], env)  # the first load writes the cache file
        print(f"  cache fill (load + write): {time.perf_counter() - t0:.1f} s with process start")
        rows["HF directory, cache hit"] = measure("cache hit", [str(a.model), *opts, "1"], a.reps, env)

    hf, tlm = rows["HF directory, no cache"], rows[".tlm file"]
    print("\n| source | load (s) | peak RSS after load (MiB) | first token (s) | peak RSS after it (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['load']:.3f} | {r['rss_load'] / 2**20:.0f} | {r['first']:.3f} | "
              f"{r['rss_first'] / 2**20:.0f} |")
    print(f"| HF / .tlm | {hf['load'] / tlm['load']:.0f}x | {hf['rss_load'] / tlm['rss_load']:.1f}x | "
          f"{hf['first'] / tlm['first']:.1f}x | {hf['rss_first'] / tlm['rss_first']:.1f}x |")


if __name__ == "__main__":
    main()
