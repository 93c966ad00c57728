"""ternlm against llama.cpp (through llama-cpp-python), and bitnet.cpp where built, on BitNet b1.58 2B4T shapes,
side by side in one run.

    pip install gguf==0.19.0
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36   # ~4 min on 2 cores
    python benchmarks/vs_llamacpp.py [--threads 1 2] [--reps 3] [--pp512] [--formats tq2_0 tq1_0]
                                     [--heads f16 q8_0 q6_k] [--cache DIR] [--bitnet-cpp BUILD/bin/llama-bench]

The random 2B4T-shaped model (benchmarks/make_2b4t_shapes.py) is written once to --cache (default
~/.cache/ternlm-bench/), and the SAME ternary weights once per (format, head) as a llama.cpp GGUF by
ternlm.formats.gguf_write: arch `bitnet`, TQ2_0/TQ1_0 projections holding ternary x per-tensor scale (the same
scale in every 256-block), F32 norms, the tied embedding/head `token_embd` in F16, Q8_0 or Q6_K, and no vocabulary
(`tokenizer.ggml.model` "no_vocab": the benchmark feeds token ids).
llama.cpp's `bitnet` arch is the SiLU-gated 1bitLLM variant while 2B4T uses relu²: the weights read and the matmuls
done are the same, so the speed comparison holds although the logits differ.

--bitnet-cpp: the llama-bench of a bitnet.cpp build (github.com/microsoft/BitNet, built locally; it is not a
package). The same weights are written once per head as I2_S (bitnet.cpp's `bitnet-b1.58`, the real 2B4T's
architecture and its default F16 head), and each rep runs its llama-bench once per figure (-r 1, after its own
warm-up). Its tg64 starts from an empty context rather than after the prompt: at these lengths attention is a
small part of a step.

pp = one batch of --pp tokens from an empty context; tg = 64 single-token steps after it (greedy argmax), like
llama-bench. Engines alternate within each rep and the medians of --reps are reported; the machine is shared, so
compare figures from one run only. Decode ceiling = measured bandwidth (ternlm.kernels.read_bandwidth: one pass over
1 GiB with all threads, best of 3) / bytes read per token.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import llama_cpp  # llama-cpp-python==0.3.36
import numpy as np
from bench_decode import bench as bench_ternlm
from make_2b4t_shapes import main as make_model

import ternlm
from ternlm import kernels
from ternlm.formats import open_model
from ternlm.formats.gguf import read_gguf
from ternlm.formats.gguf_write import write_gguf

FORMATS = ("tq2_0", "tq1_0")
HEADS = ("f16", "q8_0", "q6_k")
TERNLM_HEADS = {"f16": "float"}  # ternlm.load(head=...) names, where they differ; "float" keeps the F16 checkpoint


def bench_gguf(hf: Path, cache: Path, fmt: str, head: str) -> tuple[Path, int]:
    """(path, bytes of its tensors) of the random model as a GGUF of ternary type `fmt` (tq2_0 / tq1_0 for
    llama.cpp, i2_s for bitnet.cpp) and `head`, written into `cache` once (ternlm.formats.gguf_write).
    For the TQ types the scales are rounded to float16 first: the real 2B4T's bf16 scales are float16 numbers,
    so its GGUF has no `.scale` multipliers, and neither should this one (llama.cpp would do an extra multiply
    per projection). I2_S keeps the float32 scales as they are."""
    path = cache / f"2b4t-random-{fmt}-{head}.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        model = open_model(hf)
        for lin in (lin for layer in model.weights.layers for lin in layer.linears()) if fmt != "i2_s" else ():
            half = np.asarray(lin.scale, np.float32).astype(np.float16).astype(np.float32)
            lin.scale = half if half.ndim else float(half)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*relu²")  # documented above: llama.cpp computes SiLU
            warnings.filterwarnings("ignore", message=".*no tokenizer")
            write_gguf(model, path, ternary_type=fmt, head_type=head, name="2b4t-random")
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    return path, sum(t.nbytes for t in read_gguf(path).tensors.values())


def bench_bitnet(llama_bench: Path, model: Path, threads: int, pp: int, tg: int) -> tuple[float, float]:
    """(prefill tok/s of pp tokens, decode tok/s of tg tokens) from one run of bitnet.cpp's llama-bench."""
    # -ub 256: with one thread and a 512-token micro-batch, the 2026-03 build dies with SIGSEGV (2 threads do not);
    # a 512-token prompt then goes in two passes of 256.
    cmd = [str(llama_bench), "-m", str(model), "-p", str(pp), "-n", str(tg), "-t", str(threads), "-r", "1",
           "-ub", "256", "-o", "json"]
    tests = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    rate = {(t["n_prompt"], t["n_gen"]): float(t["avg_ts"]) for t in tests}
    return rate.get((pp, 0), float("nan")), rate.get((0, tg), float("nan"))


def bench_llama(llm: llama_cpp.Llama, pp: int, tg: int) -> tuple[float, float]:
    """(prefill tok/s for one batch of pp tokens, decode tok/s for tg tokens after them), as ternlm's bench."""
    prompt = np.random.default_rng(0).integers(0, llm.n_vocab(), pp).tolist()
    llm.reset()  # eval() drops the KV cache beyond n_tokens
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(tg):  # Llama.scores stays empty unless logits_all: read the last row from the context
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    return pp / (t1 - t0), tg / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp512", action="store_true", help="also time a 512-token prefill")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=["tq2_0"])
    ap.add_argument("--heads", nargs="+", choices=HEADS, default=["f16", "q8_0", "q6_k"])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ternlm-bench")
    ap.add_argument("--bitnet-cpp", type=Path, help="llama-bench of a local bitnet.cpp build: add it to the run")
    args = ap.parse_args()
    pps = [128, 512] if args.pp512 else [128]

    hf = args.cache / "2b4t-random"
    if not (hf / "config.json").exists():  # written last by make_model
        t0 = time.perf_counter()
        make_model(hf)
        print(f"wrote {hf} in {time.perf_counter() - t0:.0f} s")
    engines = {}  # label -> (engine, format, head, bytes per token, bench(pp, tg), set_threads(n))
    load_params = inspect.signature(ternlm.load).parameters
    for head in args.heads if "head" in load_params else [None]:
        try:
            model = ternlm.load(hf, head=TERNLM_HEADS.get(head, head)) if head else ternlm.load(hf)
        except (ternlm.TernlmError, ValueError) as e:
            print(f"ternlm head={head}: skipped ({e})")
            continue
        info = model.info()
        engines[f"ternlm {head}"] = ("ternlm", "hf-packed", head or info["head_dtype"], info["bytes_per_token"],
                                     lambda pp, tg, m=model: bench_ternlm(m, pp, tg), kernels.set_threads)
    for fmt in args.formats:
        for head in args.heads:
            path, nbytes = bench_gguf(hf, args.cache, fmt, head)
            llm = llama_cpp.Llama(str(path), n_threads=1, n_threads_batch=1, n_ctx=max(pps) + 128, n_batch=512,
                                  logits_all=False, verbose=False)
            engines[f"llama {fmt} {head}"] = ("llama.cpp", fmt, head, nbytes,
                                              lambda pp, tg, m=llm: bench_llama(m, pp, tg),
                                              lambda n, m=llm: llama_cpp.llama_set_n_threads(m.ctx, n, n))

    for head in args.heads if args.bitnet_cpp else []:
        path, nbytes = bench_gguf(hf, args.cache, "i2_s", head)
        threads_now = {"n": 1}
        engines[f"bitnet.cpp {head}"] = (
            "bitnet.cpp", "i2_s", head, nbytes,
            lambda pp, tg, p=path, t=threads_now: bench_bitnet(args.bitnet_cpp, p, t["n"], pp, tg),
            lambda n, t=threads_now: t.update(n=n))

    kernels.set_threads(max(args.threads))
    bw = kernels.read_bandwidth()
    print(f"memory bandwidth ({max(args.threads)} threads, one pass over 1 GiB, best of 3): {bw / 1e9:.1f} GB/s; "
          f"reps {args.reps}")
    results: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    for threads in args.threads:
        for *_, fn, set_threads in engines.values():
            set_threads(threads)
            fn(8, 4)  # warm up: page in the weights, start thread pools
        for _ in range(args.reps):  # alternate engines inside each rep
            for label, (*_, fn, set_threads) in engines.items():
                set_threads(threads)
                run = fn(128, 64)
                extra = tuple(fn(pp, 0)[0] for pp in pps[1:])
                results.setdefault((label, threads), []).append((run[0], *extra, run[1]))

    ref = {}  # (head, threads) -> ternlm medians, for the ratios
    cols = [f"pp{pp}" for pp in pps] + ["tg64"]
    print(f"\n{'engine':10} {'weights':9} {'head':5} {'thr':>3} " + " ".join(f"{c:>7}" for c in cols)
          + f" {'MB/tok':>7} {'GB/s':>5} {'ceiling':>7}  ternlm/peer " + " ".join(cols))
    for (label, threads), runs in results.items():
        engine, fmt, head, nbytes, *_ = engines[label]
        med = [statistics.median(r[i] for r in runs) for i in range(len(cols))]
        line = (f"{engine:10} {fmt:9} {head:5} {threads:3d} " + " ".join(f"{m:7.1f}" for m in med)
                + f" {nbytes / 1e6:7.0f} {med[-1] * nbytes / 1e9:5.1f} {bw / nbytes:7.1f}")
        if engine == "ternlm":
            ref[(head, threads)] = med
        else:
            base = ref.get((head, threads)) or ref.get(("q8_0", threads))  # same head, else ternlm's default
            if base:
                line += "  " + " ".join(f"{b / m:5.2f}x" for b, m in zip(base, med, strict=True))
        print(line)
    print("ceiling = measured bandwidth / bytes per token (tg tok/s)")
    print("ratios use the ternlm row of the same head and threads (else ternlm's default, Q8_0)")


if __name__ == "__main__":
    main()
