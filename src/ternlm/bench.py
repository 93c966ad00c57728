"""`ternlm bench`: prefill and decode speed of ternary models against ternlm's full-precision baseline.

Runs a given model, or dummy models with the published BitNet shapes (``SHAPES``) built in memory, through:
- "ternlm": the ternary engine (2-bit packed weights, Q8_0 head);
- "baseline-f16" (or bf16/f32): the same transformer with float weights (``ternlm.baseline``);
- optionally "llama.cpp-TQ2_0" and "llama.cpp-F16": llama-cpp-python on GGUF files of the same weights.

Measured like benchmarks/bench_decode.py: a prefill of `pp` tokens from an empty cache (its wall time is the
time to first token), then `tg` single-token decode steps (greedy), after a warm-up; medians of `reps`.
Weight bytes per token are what one decode step reads (linear layers + head + norms); bandwidth achieved is
that times decode tok/s, printed against ``kernels.read_bandwidth`` measured in the same run. Energy is
RAPL's package counter where readable, else CPU seconds x a per-core power, labelled an estimate.

JSON schema ("schema": "ternlm-bench/1"; units are in the key names: _bytes, _s, _tok_s, _bytes_per_s, _j):

    created: ISO 8601 time; ternlm_version: str; command: str
    machine: {cpu: str, logical_cpus: int, mem_total_bytes: int, mem_available_bytes: int, isa: str,
              blas: str, energy_source: "rapl" | "estimate", watts_per_core: float | null,
              other_cpu_busy: float (CPUs kept busy by other processes at the start, 0 on an idle machine),
              bandwidth: [{threads: int, bytes_per_s: float}]}
    settings: {pp: int, tg: int, reps: int, threads: [int], baseline: str | null, llamacpp: bool,
               llamacpp_version: str | null, llamacpp_reason: str | null}
    models: [{name: str, source: "dummy" | "path", path: str | null, params: int (ternary weights),
              shape: {dim, layers, heads, kv_heads, ffn_dim, vocab: int, activation: str, note: str},
              status: "ok" | "skipped", reason: str | null,
              runs: [{engine: str, threads: int | null, status: "ok" | "skipped" | "estimated",
                      reason: str | null, weight_bytes_per_token: int, build_s: float | null,
                      prefill_tokens: int, decode_tokens: int, prefill_tok_s, ttft_s, decode_tok_s,
                      bandwidth_bytes_per_s, bandwidth_fraction, peak_rss_bytes, joules_per_token,
                      cpu_s_per_token: float | null, energy_source: "rapl" | "estimate" | null}],
              speedups: [{metric: "decode" | "prefill", versus: str (engine), threads: int, ratio: float,
                          estimated: bool}]}]

A skipped model or engine keeps its entry with status "skipped" and the reason (e.g. not enough memory);
an engine whose speed is only estimated (the float baseline of a model too big for RAM: the best read bandwidth
of the run / weight bytes per token, an upper bound of its speed; ``finalize_estimates``) has status
"estimated" and only decode_tok_s and bandwidth_bytes_per_s set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ternlm import __version__, baseline, kernels, ternary
from ternlm.config import ModelConfig
from ternlm.errors import ParamError, TernlmError
from ternlm.formats import LoadedModel
from ternlm.formats.gguf_write import write_gguf
from ternlm.kvcache import KVCache
from ternlm.layers import Q8Matrix, TernaryLinear
from ternlm.model import LayerWeights, ModelWeights, Transformer

SCHEMA = "ternlm-bench/1"
DEFAULT_WATTS_PER_CORE = 5.0  # a busy server core: e.g. a 64-core, 360 W EPYC 9005 is about 5.6 W per core
GB = 1e9


# ---- shapes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A BitNet b1.58 model shape. Dummy shapes are multi-head (kv_heads = heads), as bitnet.cpp's are."""

    name: str
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn_dim: int
    vocab: int
    activation: str = "silu"
    note: str = ""

    def config(self, max_seq_len: int) -> ModelConfig:
        return ModelConfig(arch="bitnet", dim=self.dim, n_layers=self.layers, n_heads=self.heads,
                           n_kv_heads=self.kv_heads, ffn_dim=self.ffn_dim, vocab_size=self.vocab,
                           hidden_act=self.activation, rope_theta=500_000.0 if self.name == "2B4T" else 10_000.0,
                           max_seq_len=max_seq_len, tie_embeddings=True, scale_mode="multiply")

    @property
    def params(self) -> int:
        """Ternary weights: q, k, v, o, gate, up, down of every layer."""
        kv = self.kv_heads * self.dim // self.heads
        return self.layers * (2 * self.dim * self.dim + 2 * kv * self.dim + 3 * self.dim * self.ffn_dim)


_BN = "microsoft/BitNet utils/generate-dummy-bitnet-model.py"
_VOCAB = 32002  # the dummy models' vocabulary (1bitLLM's LLaMA-2 tokenizer + 2 tokens)
SHAPES = {s.name: s for s in (
    Shape("125M", 768, 11, 12, 12, 3072, _VOCAB, note=_BN),
    Shape("350M", 1024, 24, 16, 16, 3072, _VOCAB, note=_BN),
    Shape("700M", 1536, 24, 16, 16, 4096, _VOCAB,
          note="not in bitnet.cpp's dummy list; 1bitLLM/bitnet_b1_58-large (the real 0.7B) shape"),
    Shape("1.5B", 1536, 28, 32, 32, 9216, _VOCAB, note=_BN),
    Shape("2B4T", 2560, 30, 20, 5, 6912, 128256, activation="relu2",
          note="microsoft/bitnet-b1.58-2B-4T config.json (GQA 20/5, relu², vocab 128256)"),
    Shape("3.8B", 3840, 24, 32, 32, 8192, _VOCAB, note=_BN),
    Shape("7B", 4096, 32, 32, 32, 12032, _VOCAB, note=_BN),
    Shape("13B", 5120, 40, 40, 40, 13824, _VOCAB, note=_BN),
    Shape("30B", 6656, 60, 52, 52, 16384, _VOCAB, note=_BN),
    Shape("70B", 8192, 80, 64, 64, 24576, _VOCAB, note=_BN),
    Shape("100B", 8192, 72, 64, 64, 45568, _VOCAB, note=_BN),
)}

# Published decode tok/s, bitnet.cpp against llama.cpp on dummy models (arXiv 2410.16144 figures):
# size -> (i7-13700H llama.cpp, i7-13700H bitnet.cpp, M2 Ultra llama.cpp, M2 Ultra bitnet.cpp); and the
# i7-13700H I2_S-vs-Float16 speedups of arXiv 2502.11880. None where the paper has no figure.
PUBLISHED: dict[str, tuple[float | None, float | None, float | None, float | None]] = {
    "125M": (164.04, 389.08, 434.40, 593.43), "350M": (56.67, 172.95, 185.56, 281.51),
    "700M": (30.73, 119.08, 114.47, 194.38), "1.5B": (15.02, 67.12, 60.95, 119.24),
    "3.8B": (5.85, 30.51, 28.31, 84.77), "7B": (3.30, 18.75, 15.61, 52.36), "13B": (1.78, 10.99, 8.79, 33.78),
    "30B": (None, 5.10, 3.78, 17.07), "70B": (None, 2.44, 1.71, 8.67), "100B": (None, 1.70, None, 6.58),
}
PUBLISHED_I2S_VS_F16 = {"700M": 4.08, "1.5B": 5.18, "3.8B": 5.99, "7B": 6.25, "13B": 5.97}


# ---- the machine ----------------------------------------------------------------------------------


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping or OOM)."""
    return _meminfo("MemAvailable")


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def other_cpu_busy(seconds: float = 0.5) -> float:
    """CPUs' worth of work done by other processes over `seconds` while this one sleeps (from /proc/stat)."""
    def busy_total() -> tuple[float, float]:
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0), sum(v)  # all but idle and iowait; all

    try:
        b0, t0 = busy_total()
        time.sleep(seconds)
        b1, t1 = busy_total()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1)


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Peak resident bytes since the last reset (VmHWM), else of the whole process (ru_maxrss)."""
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class EnergyMeter:
    """Joules from RAPL package counters where readable, else CPU seconds x watts_per_core (an estimate).

    RAPL counts the whole package: other processes on a shared host are included. The estimate counts this
    process's CPU time only, and no memory or uncore power.
    """

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE, root: str = "/sys/class/powercap") -> None:
        self.watts_per_core = watts_per_core
        self.zones: list[tuple[Path, int]] = []  # (energy_uj file, wrap range)
        for zone in sorted(Path(root).glob("intel-rapl:*")):
            if zone.name.count(":") != 1:  # a sub-zone (core, dram) of a package
                continue
            try:
                int((zone / "energy_uj").read_text())
                wrap = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            self.zones.append((zone / "energy_uj", wrap))

    @property
    def source(self) -> str:
        return "rapl" if self.zones else "estimate"

    def read(self) -> tuple[list[int], float]:
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process, microsecond resolution
        return [int(p.read_text()) for p, _ in self.zones], r.ru_utime + r.ru_stime

    def joules(self, start: tuple[list[int], float], end: tuple[list[int], float]) -> tuple[float, float]:
        """(joules, cpu seconds) between two reads."""
        cpu = end[1] - start[1]
        if not self.zones:
            return cpu * self.watts_per_core, cpu
        uj = sum((e - s) % wrap for (e, s, (_, wrap)) in zip(end[0], start[0], self.zones, strict=True))
        return uj / 1e6, cpu


class Progress:
    """One status line on stderr: a bar over the planned measurement steps and what runs now."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.label = ""

    def show(self, label: str | None = None) -> None:
        if label is not None:
            self.label = label
        if self.enabled:
            filled = int(30 * min(self.done, self.total) / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {self.label[:60]:<60}")
            self.stream.flush()

    def advance(self, n: int = 1, label: str | None = None) -> None:
        self.done += n
        self.show(label)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


# ---- dummy models ---------------------------------------------------------------------------------


class _Filler:
    """Random bytes for big weight arrays at memcpy speed: tiles of a 16 MiB random pool, each array starting
    at its own offset. Speed does not depend on the values, and every array has its own memory."""

    POOL = 16 << 20

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        b = self.rng.integers(0, 256, self.POOL, dtype=np.uint8)
        self.codes = b ^ (((b >> 1) & b & 0x55) << 1)  # 2-bit fields of 3 (no weight) become 1 (weight 0)
        q = b.view(np.int8).copy()
        q[q == -128] = -127  # Q8_0 values lie in [-127, 127]
        self.q8 = q

    def fill(self, pool: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, pool.dtype)
        flat = out.reshape(-1)
        pos, start = 0, int(self.rng.integers(0, len(pool)))
        while pos < flat.size:
            n = min(len(pool) - start, flat.size - pos)
            flat[pos:pos + n] = pool[start:start + n]
            pos, start = pos + n, 0
        return out


def ternary_bytes(shape: Shape) -> int:
    """Packed bytes of a shape's ternary layers in ternlm's 2-bit layout."""
    kv = shape.kv_heads * shape.dim // shape.heads
    rows_by_k = {shape.dim: 2 * shape.dim + 2 * kv + 2 * shape.ffn_dim, shape.ffn_dim: shape.dim}
    if shape.dim == shape.ffn_dim:
        rows_by_k = {shape.dim: sum(rows_by_k.values())}
    return shape.layers * sum(rows * ternary.padded_k(k) // 4 for k, rows in rows_by_k.items())


def q8_head_bytes(shape: Shape) -> int:
    return shape.vocab * shape.dim * 34 // 32


def dummy_weights(shape: Shape, seed: int = 0) -> ModelWeights:
    """Random ternary weights of `shape` packed straight into ternlm's layout, with a Q8_0 tied head.

    Each projection gets one float16-exact scale of 1/sqrt(in_features), which keeps activations of order 1
    through the layers (the norms are ones), so no inf or NaN slows any engine down.
    """
    f = _Filler(seed)
    kv = shape.kv_heads * shape.dim // shape.heads

    def linear(rows: int, k: int) -> TernaryLinear:
        scale = float(np.float16(k ** -0.5))
        return TernaryLinear(f.fill(f.codes, (rows, ternary.padded_k(k) // 4)), k, scale)

    layers = []
    for _ in range(shape.layers):
        ones = np.ones(shape.dim, np.float32)
        layers.append(LayerWeights(attn_norm=ones, ffn_norm=ones.copy(), attn_sub_norm=ones.copy(),
                                   ffn_sub_norm=np.ones(shape.ffn_dim, np.float32),
                                   qkv=linear(shape.dim + 2 * kv, shape.dim), o=linear(shape.dim, shape.dim),
                                   gate_up=linear(2 * shape.ffn_dim, shape.dim), down=linear(shape.dim, shape.ffn_dim)))
    head = Q8Matrix(f.fill(f.q8, (shape.vocab, shape.dim)),
                    np.full((shape.vocab, shape.dim // 32), 1 / 1024, np.float16))
    return ModelWeights(embed=head, norm=np.ones(shape.dim, np.float32), head=head, layers=layers)


# ---- llama.cpp GGUF files of the same weights ------------------------------------------------------


def write_llama_gguf(config: ModelConfig, weights: ModelWeights, path: Path, kind: str) -> int:
    """The model as a GGUF llama.cpp runs (arch `bitnet`, no vocabulary): projections TQ2_0 with the Q8_0
    head (kind "TQ2_0"), or everything F16 (kind "F16", the full-precision file). Returns its bytes."""
    with warnings.catch_warnings():  # a relu² shape written as `bitnet`: llama.cpp's speed is what is measured
        warnings.simplefilter("ignore")
        write_gguf(LoadedModel(config, weights, None), path, ternary_type=kind,
                   head_type="F16" if kind == "F16" else "Q8_0")
    return path.stat().st_size


def _llama_cpp() -> tuple[Any, str | None]:
    """(the llama_cpp module, None) or (None, why it cannot be used)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        return None, f"llama-cpp-python is not installed ({e.name}): pip install llama-cpp-python gguf"
    return llama_cpp, None


# ---- engines and measurement ----------------------------------------------------------------------


@dataclass
class Engine:
    """One way of running a model: prefill a prompt from an empty cache, decode one token at a time."""

    name: str
    weight_bytes_per_token: int
    prefill: Callable[[np.ndarray], int]  # prompt ids -> the next token (greedy)
    decode: Callable[[int, int], int]  # (token, its position) -> the next token
    set_threads: Callable[[int], None]
    close: Callable[[], None] = lambda: None


def transformer_engine(name: str, t: Transformer, max_len: int) -> Engine:
    cache = KVCache(t.config, max_len)  # allocated once: every prefill starts again at position 0

    def prefill(ids: np.ndarray) -> int:
        return int(t.forward(ids, cache, 0, last_only=True)[0].argmax())

    def decode(token: int, pos: int) -> int:
        return int(t.forward(np.array([token]), cache, pos, last_only=True)[0].argmax())

    return Engine(name, baseline.weight_bytes_per_token(t.w), prefill, decode, kernels.set_threads)


def llama_engine(llama_cpp: Any, name: str, path: Path, nbytes: int, max_len: int) -> Engine:
    llm = llama_cpp.Llama(str(path), n_threads=1, n_threads_batch=1, n_ctx=max_len, n_batch=512,
                          logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def last() -> int:  # Llama.scores stays empty without logits_all: read the last row from the context
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def prefill(ids: np.ndarray) -> int:
        llm.reset()
        llm.eval(ids.tolist())
        return last()

    def decode(token: int, pos: int) -> int:
        llm.eval([token])
        return last()

    return Engine(name, nbytes, prefill, decode, lambda n: llama_cpp.llama_set_n_threads(llm.ctx, n, n), llm.close)


def measure(engine: Engine, threads: int, pp: int, tg: int, reps: int, vocab: int, meter: EnergyMeter,
            bandwidth: float, tick: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """Medians over `reps` of prefill (pp tokens from an empty cache) and tg decode steps, after a warm-up."""
    engine.set_threads(threads)
    prompt = np.random.default_rng(0).integers(0, vocab, pp)
    token = engine.prefill(prompt[:min(8, pp)])  # warm up: page in the weights, start the thread pools
    for i in range(2):
        token = engine.decode(token, min(8, pp) + i)
    prefill_s, decode_s, joules, cpu = [], [], [], []
    for rep in range(reps):
        tick(f"{engine.name} {threads}T rep {rep + 1}/{reps}")
        t0 = time.perf_counter()
        token = engine.prefill(prompt)
        t1 = time.perf_counter()
        e0 = meter.read()
        t2 = time.perf_counter()
        for i in range(tg):
            token = engine.decode(token, pp + i)
        t3 = time.perf_counter()
        j, c = meter.joules(e0, meter.read())
        prefill_s.append(t1 - t0)
        decode_s.append(t3 - t2)
        joules.append(j / tg)
        cpu.append(c / tg)
    decode_rate = tg / statistics.median(decode_s)
    achieved = engine.weight_bytes_per_token * decode_rate
    return {"prefill_tok_s": pp / statistics.median(prefill_s), "ttft_s": statistics.median(prefill_s),
            "decode_tok_s": decode_rate, "bandwidth_bytes_per_s": achieved,
            "bandwidth_fraction": achieved / bandwidth if bandwidth else None,
            "joules_per_token": statistics.median(joules), "cpu_s_per_token": statistics.median(cpu),
            "energy_source": meter.source}


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class Options:
    threads: list[int]
    pp: int = 64
    tg: int = 32
    reps: int = 3
    baseline: str | None = "f16"
    llamacpp: bool = False
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    reserve_bytes: int = 2 << 30  # memory left to the rest of the (shared) machine
    workdir: Path | None = None
    seed: int = 0
    bandwidth: dict[int, float] = field(default_factory=dict)

    @property
    def max_len(self) -> int:
        return self.pp + self.tg + 16


def _run_entry(engine: str, threads: int | None, status: str, opts: Options, nbytes: int,
               reason: str | None = None, **numbers: Any) -> dict[str, Any]:
    entry = {"engine": engine, "threads": threads, "status": status, "reason": reason,
             "weight_bytes_per_token": int(nbytes), "build_s": None, "prefill_tokens": opts.pp,
             "decode_tokens": opts.tg, "prefill_tok_s": None, "ttft_s": None, "decode_tok_s": None,
             "bandwidth_bytes_per_s": None, "bandwidth_fraction": None, "peak_rss_bytes": None,
             "joules_per_token": None, "cpu_s_per_token": None, "energy_source": None}
    entry.update(numbers)
    return entry


def _fits(need: int, opts: Options) -> str | None:
    """None when `need` bytes fit in MemAvailable less the reserve, else the reason they do not."""
    avail = mem_available()
    if avail and need > avail - opts.reserve_bytes:
        return (f"needs {need / GB:.1f} GB, {avail / GB:.1f} GB available (MemAvailable) less "
                f"{opts.reserve_bytes / GB:.1f} GB kept for the rest of the machine")
    return None


class _Runner:
    """Runs the engines of one model in turn, so that at most one big model is in memory besides the
    ternary one (from which the others are made)."""

    def __init__(self, opts: Options, meter: EnergyMeter, progress: Progress) -> None:
        self.opts, self.meter, self.progress = opts, meter, progress

    def run(self, engine: Engine, build_s: float, held_bytes: int = 0) -> list[dict[str, Any]]:
        """Every thread count of `engine`; peak RSS excludes `held_bytes` of other engines' weights."""
        o = self.opts
        _reset_peak_rss()
        runs = []
        for t in o.threads:
            r = measure(engine, t, o.pp, o.tg, o.reps, self._vocab, self.meter, o.bandwidth.get(t, 0.0),
                        tick=lambda label: self.progress.advance(1, f"{self._model} {label}"))
            runs.append(_run_entry(engine.name, t, "ok", o, engine.weight_bytes_per_token, build_s=build_s, **r))
        peak = _peak_rss() - held_bytes
        for r in runs:
            r["peak_rss_bytes"] = peak
        return runs

    def skip(self, engine: str, nbytes: int, reason: str) -> list[dict[str, Any]]:
        self.progress.advance(len(self.opts.threads) * self.opts.reps)
        return [_run_entry(engine, None, "skipped", self.opts, nbytes, reason)]

    def model(self, name: str, config: ModelConfig, weights: ModelWeights, build_s: float) -> list[dict[str, Any]]:
        """All engines on one model; `weights` are the ternary ones."""
        self._model, self._vocab = name, config.vocab_size
        o = self.opts
        ternlm_engine = transformer_engine("ternlm", Transformer(config, weights), o.max_len)
        ternary_held = ternlm_engine.weight_bytes_per_token
        runs = self.run(ternlm_engine, build_s)
        if o.llamacpp:
            runs += self.llama(config, weights, "TQ2_0", ternary_held)
            runs += self.llama(config, weights, "F16", ternary_held)
        if o.baseline:
            runs += self.baseline(config, weights)
        return runs

    def llama(self, config: ModelConfig, weights: ModelWeights, kind: str, held: int) -> list[dict[str, Any]]:
        name = f"llama.cpp-{kind}"
        llama_cpp, why = _llama_cpp()
        f16_bytes = _float_bytes(config, weights, 2)
        nbytes = f16_bytes if kind == "F16" else None
        if llama_cpp is None:
            return self.skip(name, nbytes or 0, why or "")
        if kind == "TQ2_0" and any(k % 256 for k in (config.dim, config.ffn_dim)):
            return self.skip(name, 0, f"TQ2_0 needs widths that are multiples of 256 ({config.dim}, {config.ffn_dim})")
        est = nbytes or baseline.weight_bytes_per_token(weights) * 33 // 32  # TQ2_0: 2.06 bits per weight
        why = _fits(est + (256 << 20), self.opts)
        workdir = self.opts.workdir or Path(tempfile.gettempdir())
        if why is None and shutil.disk_usage(workdir).free < est + (1 << 30):
            why = f"needs {est / GB:.1f} GB of disk for the GGUF file in {workdir}"
        if why:
            return self.skip(name, est, why)
        with tempfile.TemporaryDirectory(dir=workdir, prefix="ternlm-bench-") as tmp:
            self.progress.show(f"{self._model} writing {kind} GGUF")
            t0 = time.perf_counter()
            path = Path(tmp) / f"{self._model}-{kind}.gguf"
            write_llama_gguf(config, weights, path, kind)
            engine = llama_engine(llama_cpp, name, path, _gguf_weight_bytes(path), self.opts.max_len)
            try:
                return self.run(engine, time.perf_counter() - t0, held)
            finally:
                engine.close()
                del engine
                gc.collect()

    def baseline(self, config: ModelConfig, weights: ModelWeights) -> list[dict[str, Any]]:
        o = self.opts
        name = f"baseline-{o.baseline}"
        nbytes = _float_bytes(config, weights, baseline.BYTES_PER_WEIGHT[o.baseline])
        why = _fits(nbytes + (512 << 20), o)
        if why:
            runs = self.skip(name, nbytes, why)
            runs += [_run_entry(name, t, "estimated", o, nbytes, ESTIMATE_REASON) for t in o.threads]
            return runs
        self.progress.show(f"{self._model} building the {o.baseline} baseline")
        t0 = time.perf_counter()
        engine = transformer_engine(name, baseline.build_baseline(config, weights, o.baseline), o.max_len)
        build_s = time.perf_counter() - t0
        try:
            return self.run(engine, build_s, baseline.weight_bytes_per_token(weights))
        finally:
            del engine
            gc.collect()


def _float_bytes(config: ModelConfig, weights: ModelWeights, per_weight: int) -> int:
    """Weight bytes per token of the model with every linear layer and the head in a float format."""
    params = sum(lin.in_features * lin.out_features for lw in weights.layers for lin in lw.linears())
    norms = baseline.weight_bytes_per_token(weights) - weights.head.nbytes \
        - sum(lin.nbytes for lw in weights.layers for lin in lw.linears())
    return (params + config.vocab_size * config.dim) * per_weight + norms


def _gguf_weight_bytes(path: Path) -> int:
    """Bytes a decode step reads from a GGUF: every tensor (the token_embd rows are the tied head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


ESTIMATE_REASON = ("bandwidth-bound estimate: the highest read bandwidth of this run (the probe's, or what any "
                   "measured engine achieved at these threads) / weight bytes per token; an upper bound of its "
                   "decode speed, so speedups over it are lower bounds")


def finalize_estimates(results: dict[str, Any]) -> None:
    """Set the decode speed of every "estimated" run (see ESTIMATE_REASON) and recompute the speedups.

    The probe alone is not an upper bound on a shared host: it has read less than a decode step did in the
    same run, so the best bandwidth any measured engine achieved at that thread count counts too.
    """
    best = {b["threads"]: b["bytes_per_s"] for b in results["machine"]["bandwidth"]}
    for m in results["models"]:
        for r in m["runs"]:
            if r["status"] == "ok" and r["bandwidth_bytes_per_s"]:
                best[r["threads"]] = max(best.get(r["threads"], 0.0), r["bandwidth_bytes_per_s"])
    for m in results["models"]:
        for r in m["runs"]:
            if r["status"] == "estimated" and best.get(r["threads"]):
                r["decode_tok_s"] = best[r["threads"]] / r["weight_bytes_per_token"]
                r["bandwidth_bytes_per_s"] = best[r["threads"]]
        if m["runs"]:
            m["speedups"] = _speedups(m["runs"])


def _speedups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ternlm's ratio over every other engine, per thread count and metric."""
    ours = {r["threads"]: r for r in runs if r["engine"] == "ternlm" and r["status"] == "ok"}
    out = []
    for r in runs:
        if r["engine"] == "ternlm" or r["status"] == "skipped" or r["threads"] not in ours:
            continue
        for metric in ("decode", "prefill"):
            a, b = ours[r["threads"]][f"{metric}_tok_s"], r[f"{metric}_tok_s"]
            if a and b:
                out.append({"metric": metric, "versus": r["engine"], "threads": r["threads"], "ratio": a / b,
                            "estimated": r["status"] == "estimated"})
    return out


def _shape_entry(config: ModelConfig, note: str) -> dict[str, Any]:
    return {"dim": config.dim, "layers": config.n_layers, "heads": config.n_heads, "kv_heads": config.n_kv_heads,
            "ffn_dim": config.ffn_dim, "vocab": config.vocab_size, "activation": config.hidden_act, "note": note}


def run_bench(models: Sequence[str | Path] = (), *, sizes: Sequence[str] | None = None,
              threads: Sequence[int] | None = None, pp: int = 64, tg: int = 32, reps: int = 3,
              baseline_precision: str | None = "f16", llamacpp: bool = False,
              watts_per_core: float = DEFAULT_WATTS_PER_CORE, reserve_gb: float = 2.0,
              workdir: str | Path | None = None, progress: bool = True, out: TextIO | None = None) -> dict[str, Any]:
    """Benchmark `models` (paths or cached hub ids) and the dummy `sizes` (names in SHAPES; all of them when
    neither is given); returns the results dict described at the top of this module. `out` gets one line
    per finished model."""
    if sizes is None and not models:
        sizes = list(SHAPES)
    unknown = [s for s in sizes or () if s not in SHAPES]
    if unknown:
        raise ParamError(f"unknown model size(s) {unknown}; choose from {list(SHAPES)}")
    if baseline_precision is not None and baseline_precision not in baseline.PRECISIONS:
        raise ParamError(f"baseline must be one of {baseline.PRECISIONS} or None, got {baseline_precision!r}")
    if pp < 1 or tg < 1 or reps < 1:
        raise ParamError(f"pp, tg and reps must be at least 1, got {pp}, {tg}, {reps}")
    thread_list = list(threads or sorted({1, kernels.default_threads()}))
    if any(t < 1 for t in thread_list):
        raise ParamError(f"thread counts must be at least 1, got {thread_list}")
    llama_cpp, llama_reason = _llama_cpp() if llamacpp else (None, "not requested (--llamacpp)")
    opts = Options(threads=thread_list, pp=pp, tg=tg, reps=reps, baseline=baseline_precision,
                   llamacpp=llamacpp, watts_per_core=watts_per_core, reserve_bytes=int(reserve_gb * GB),
                   workdir=Path(workdir) if workdir else None)
    meter = EnergyMeter(watts_per_core)
    busy = other_cpu_busy()
    if out is not None and busy > 0.1:
        out.write(f"warning: other processes keep {busy:.1f} CPUs busy: every figure will be lower than on an "
                  "idle machine\n")
    threads_before = kernels.get_threads()
    for t in thread_list:
        kernels.set_threads(t)
        opts.bandwidth[t] = kernels.read_bandwidth()
    n_engines = 1 + (baseline_precision is not None) + 2 * llamacpp
    items: list[tuple[str, Shape | None, str | Path | None]] = [(str(m), None, m) for m in models]
    items += [(s, SHAPES[s], None) for s in sizes or ()]
    bar = Progress(len(items) * n_engines * len(thread_list) * reps, progress)
    runner = _Runner(opts, meter, bar)
    results: dict[str, Any] = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ternlm_version": __version__, "command": " ".join(sys.argv),
        "machine": _machine(opts, meter),
        "settings": {"pp": pp, "tg": tg, "reps": reps, "threads": thread_list, "baseline": baseline_precision,
                     "llamacpp": llamacpp, "llamacpp_version": getattr(llama_cpp, "__version__", None),
                     "llamacpp_reason": llama_reason},
        "models": [],
    }
    try:
        for name, shape, path in items:
            entry = _bench_one(name, shape, path, opts, runner, bar)
            results["models"].append(entry)
            if out is not None:
                bar.close()
                out.write(model_line(entry) + "\n")
                out.flush()
    finally:
        bar.close()
        kernels.set_threads(threads_before)
    finalize_estimates(results)
    return results


def _bench_one(name: str, shape: Shape | None, path: str | Path | None, opts: Options, runner: _Runner,
               bar: Progress) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "source": "dummy" if shape else "path", "path": None if shape else str(path),
                             "params": shape.params if shape else None, "shape": None, "status": "ok",
                             "reason": None, "runs": [], "speedups": []}
    planned = len(runner.opts.threads) * runner.opts.reps * (1 + bool(opts.baseline) + 2 * opts.llamacpp)
    done_before = bar.done
    bar.show(f"{name}: building")
    try:
        if shape is not None:
            config = shape.config(opts.max_len)
            entry["shape"] = _shape_entry(config, shape.note)
            why = _fits(ternary_bytes(shape) + q8_head_bytes(shape) + (512 << 20), opts)
            if why:
                entry.update(status="skipped", reason=f"ternary model does not fit: {why}")
                return entry
            t0 = time.perf_counter()
            weights = dummy_weights(shape, opts.seed)
        else:
            from ternlm import hub
            from ternlm.api import load

            t0 = time.perf_counter()
            model = load(hub.resolve(path), head="q8_0", n_ctx=opts.max_len)
            config, weights = model.config, model.weights
            entry["shape"] = _shape_entry(config, "")
            entry["params"] = sum(lin.in_features * lin.out_features for lw in weights.layers for lin in lw.linears())
            del model
        build_s = time.perf_counter() - t0
        entry["runs"] = runner.model(name, config, weights, build_s)
        entry["speedups"] = _speedups(entry["runs"])
    except (TernlmError, OSError, MemoryError) as e:
        entry.update(status="skipped", reason=f"{type(e).__name__}: {e}")
    finally:
        bar.done = done_before + planned
        gc.collect()
    return entry


def _machine(opts: Options, meter: EnergyMeter) -> dict[str, Any]:
    from threadpoolctl import threadpool_info

    blas = next((f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                 for i in threadpool_info() if i.get("user_api") == "blas"), "none")
    return {"cpu": _cpu_name(), "logical_cpus": os.cpu_count() or 0, "mem_total_bytes": _meminfo("MemTotal"),
            "mem_available_bytes": mem_available(), "isa": kernels.active_isa(), "blas": blas,
            "energy_source": meter.source, "watts_per_core": None if meter.zones else meter.watts_per_core,
            "other_cpu_busy": other_cpu_busy(0.2),
            "bandwidth": [{"threads": t, "bytes_per_s": bw} for t, bw in opts.bandwidth.items()]}


# ---- reports --------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if v is None else format(v, spec)


def model_line(m: dict[str, Any]) -> str:
    if m["status"] != "ok":
        return f"{m['name']}: skipped: {m['reason']}"
    parts = [f"{r['engine']} {r['threads']}T {fmt(r['decode_tok_s'], '.1f')} tok/s"
             for r in m["runs"] if r["status"] == "ok"]
    skipped = [f"{r['engine']} skipped ({r['reason']})" for r in m["runs"] if r["status"] == "skipped"]
    return f"{m['name']}: " + ", ".join(parts + skipped)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _size_list(text: str) -> list[str]:
    if text == "all":
        return list(SHAPES)
    sizes = [x.strip() for x in text.split(",") if x.strip()]
    bad = [s for s in sizes if s not in SHAPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown size(s) {bad}; choose from {', '.join(SHAPES)} or all")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `ternlm bench` (see ``main``)."""
    p.add_argument("model", nargs="*", help="model directories, GGUF/.tlm files or cached hub ids (default: the "
                   "dummy BitNet shapes given by --sizes)")
    p.add_argument("--sizes", type=_size_list, default=None,
                   help=f"dummy model shapes, comma-separated: {','.join(SHAPES)} or all (default: all when no "
                        "model is given)")
    p.add_argument("--threads", type=_int_list, default=None, help="thread counts to sweep, e.g. 1,2 (default: 1 "
                   "and the physical cores)")
    p.add_argument("--pp", type=int, default=64, help="prompt tokens prefilled from an empty cache (default 64)")
    p.add_argument("--tg", type=int, default=32, help="tokens decoded after the prompt (default 32)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--baseline", choices=[*baseline.PRECISIONS, "none"], default="f16",
                   help="full-precision baseline: f16 (default), bf16, f32 (numpy/OpenBLAS) or none")
    p.add_argument("--llamacpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on F16 and TQ2_0 GGUFs of the same weights")
    p.add_argument("--watts-per-core", type=float, default=DEFAULT_WATTS_PER_CORE,
                   help="power of a busy core for the energy estimate where RAPL is not readable "
                        f"(default {DEFAULT_WATTS_PER_CORE})")
    p.add_argument("--reserve-gb", type=float, default=2.0,
                   help="memory to leave free; models that would not leave it are skipped (default 2)")
    p.add_argument("--workdir", default=None, help="folder for the temporary GGUF files (default: the temp dir)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON to this file")
    p.add_argument("--plots", default=None, help="write tokens_per_s.png and speedup.png to this folder")
    p.add_argument("--html", default=None, help="write a self-contained HTML report to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(args: argparse.Namespace) -> int:
    """Run `ternlm bench` with parsed ``add_arguments`` options; prints the table, writes the requested files."""
    results = run_bench(args.model, sizes=args.sizes, threads=args.threads, pp=args.pp, tg=args.tg, reps=args.reps,
                        baseline_precision=None if args.baseline == "none" else args.baseline,
                        llamacpp=args.llamacpp, watts_per_core=args.watts_per_core, reserve_gb=args.reserve_gb,
                        workdir=args.workdir, progress=not args.no_progress and sys.stderr.isatty(), out=sys.stdout)
    print()
    from ternlm import bench_report

    print(bench_report.format_table(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json_path}")
    plots: list[Path] = []
    if args.plots or args.html:
        try:
            plots = bench_report.write_plots(results, args.plots or tempfile.mkdtemp(prefix="ternlm-plots-"))
            if args.plots:
                print("wrote " + ", ".join(map(str, plots)))
        except TernlmError as e:
            print(f"plots skipped: {e}", file=sys.stderr)
    if args.html:
        bench_report.write_html(results, args.html, plots)
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ternlm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
