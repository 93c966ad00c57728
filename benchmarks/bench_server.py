"""Throughput and latency of `ternlm serve` under N concurrent streaming clients (continuous batching).

    python benchmarks/make_2b4t_shapes.py                 # once: a 2B4T-shaped random model (~16 s)
    python benchmarks/bench_server.py [--model DIR] [--threads 2] [--concurrency 1,4,8,16] [--max-tokens 64]
    python benchmarks/bench_server.py --url http://127.0.0.1:8080     # a server that is already running

Starts the real server as a subprocess (`python -m ternlm serve`) on a free port, waits for GET /ready, then for
each N runs a round of N clients at once, each streaming POST /v1/completions with a distinct token-id prompt
(no shared prefix, so the prefix cache never skips a prefill), temperature 0, `ignore_eos` and a fixed
max_tokens. Per N it reports:

- agg tok/s: completion tokens of the round / wall time of the round (first request sent to last [DONE]);
- steady tok/s: tokens that arrived while all N streams were generating (from the last stream's first token to
  the first stream's last token) / that time: the decode rate without the ramp-up and the tail;
- TTFT and inter-token latency (gaps between consecutive content chunks of one stream) p50/p90/p99;
- the ratio of both rates to the N=1 rate.

Completion tokens come from the final usage chunk (stream_options.include_usage); `chunks/tok` checks that the
server sent one content chunk per token, which the inter-token latencies assume. A model without tokenizer.json
(like the 2B4T-shaped one) streams no text, so no content chunks (and the server currently answers its token-id
completions with 400 "no tokenizer"): the benchmark then serves it from a temporary
directory of links to its files plus a synthetic word-level tokenizer.json in which every id is the word " t<id>"
(disable with --no-synthetic-tokenizer). Clients run in this process and share the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from ternlm.server import serve_subprocess

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "bench-models" / "2b4t-random"


@dataclass
class StreamResult:
    """What one client saw: when it sent, when each content chunk arrived, and the tokens usage reported."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    done: float = 0.0


@dataclass
class RoundResult:
    """The figures of one concurrency level (pooled over its repetitions)."""

    n: int
    tokens: int
    wall_s: float
    agg_tps: float
    steady_tps: float | None
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    chunks_per_token: float
    agg_ratio: float | None = None
    steady_ratio: float | None = None


# -- the server -----------------------------------------------------------------------------------------------

def synthetic_tokenizer_dir(model: Path, tmp: Path) -> Path:
    """A directory of links to `model`'s files plus a word-level tokenizer.json where id i decodes to "t<i>"."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    out = tmp / model.name
    out.mkdir()
    for f in model.iterdir():
        (out / f.name).symlink_to(f.resolve())
    # Byte-level words "Ġt<id>" (Ġ is the byte-level space): the constrained-decoding library the server
    # prepares at load needs a decoder it knows.
    tok = tokenizers.Tokenizer(WordLevel({f"\u0120t{i}": i for i in range(vocab_size)}, unk_token="\u0120t0"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    return out


@contextmanager
def server(model: Path, threads: int, slots: int, extra: list[str], timeout: float = 300.0) -> Iterator[str]:
    """`ternlm serve` on a free port with its output in a temporary file, whose tail is printed at the end."""
    args = [str(model), "--slots", str(slots), "--threads", str(threads), "--log-level", "warning", *extra]
    with tempfile.TemporaryFile(mode="w+") as log:
        try:
            with serve_subprocess(args, timeout, log) as url:
                yield url
        finally:
            log.seek(0)
            tail = log.read()[-4000:]
            if tail.strip():
                print(f"--- server log (tail) ---\n{tail}", file=sys.stderr)


# -- the clients ----------------------------------------------------------------------------------------------

async def stream_once(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> StreamResult:
    """One streaming completion; content chunk arrival times and the completion tokens of the usage chunk."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = StreamResult(sent=time.perf_counter())
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if any(c.get("text") for c in chunk.get("choices", ())):
                result.chunk_times.append(time.perf_counter())
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
    result.done = time.perf_counter()
    return result


async def run_round(url: str, n: int, prompt_tokens: int, max_tokens: int, id_range: int, seed: int
                    ) -> list[StreamResult]:
    """N clients at once, each with its own random token-id prompt."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, id_range, prompt_tokens).tolist() for _ in range(n)]
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        return list(await asyncio.gather(*(stream_once(client, url, p, max_tokens) for p in prompts)))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p = np.percentile(np.asarray(values) * 1000.0, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def summarize(n: int, rounds: list[list[StreamResult]]) -> RoundResult:
    """Pool the latencies of all repetitions of one N; throughputs are medians over the repetitions."""
    aggs, steadies, ttfts, itls, tokens, chunks, walls = [], [], [], [], 0, 0, []
    for streams in rounds:
        start, end = min(s.sent for s in streams), max(s.done for s in streams)
        toks = sum(s.tokens for s in streams)
        tokens += toks
        chunks += sum(len(s.chunk_times) for s in streams)
        walls.append(end - start)
        aggs.append(toks / (end - start))
        for s in streams:
            if s.chunk_times:
                ttfts.append(s.chunk_times[0] - s.sent)
                itls.extend(np.diff(s.chunk_times).tolist())
        if all(len(s.chunk_times) > 1 for s in streams):
            # All N generating: from the last stream's first chunk to the first stream's last chunk.
            lo = max(s.chunk_times[0] for s in streams)
            hi = min(s.chunk_times[-1] for s in streams)
            if hi > lo:
                inside = sum(sum(lo < t <= hi for t in s.chunk_times) for s in streams)
                steadies.append(inside / (hi - lo))
    return RoundResult(n=n, tokens=tokens, wall_s=statistics.median(walls), agg_tps=statistics.median(aggs),
                       steady_tps=statistics.median(steadies) if steadies else None,
                       ttft_ms=percentiles(ttfts), itl_ms=percentiles(itls),
                       chunks_per_token=chunks / tokens if tokens else 0.0)


def bench(url: str, concurrency: list[int], prompt_tokens: int, max_tokens: int, reps: int, warmup: int,
          id_range: int, seed: int) -> list[RoundResult]:
    """Warm-up rounds at the highest N, then `reps` rounds per N; ratios against the first N (normally 1).

    Every round draws new prompts from `seed` onwards: a prompt the server has seen would be a prefix-cache hit."""
    for _ in range(warmup):
        asyncio.run(run_round(url, max(concurrency), prompt_tokens, max_tokens, id_range, seed))
        seed += 1
    results = []
    for n in concurrency:
        rounds = []
        for _ in range(reps):
            rounds.append(asyncio.run(run_round(url, n, prompt_tokens, max_tokens, id_range, seed)))
            seed += 1
        results.append(summarize(n, rounds))
        r = results[-1]
        print(f"  N={n}: {r.agg_tps:.1f} tok/s aggregate", file=sys.stderr)
    base = results[0]
    for r in results:
        r.agg_ratio = r.agg_tps / base.agg_tps
        if r.steady_tps and base.steady_tps:
            r.steady_ratio = r.steady_tps / base.steady_tps
    return results


def table(results: list[RoundResult]) -> str:
    def f(x: float | None, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    lines = ["| N | agg tok/s | steady tok/s | × N=1 (agg / steady) | TTFT ms p50 / p90 / p99 "
             "| ITL ms p50 / p90 / p99 | chunks/tok |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        t, i = r.ttft_ms, r.itl_ms
        lines.append(f"| {r.n} | {r.agg_tps:.1f} | {f(r.steady_tps)} | {f(r.agg_ratio, '.2f')} / "
                     f"{f(r.steady_ratio, '.2f')} | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
                     f"{i['p50']:.1f} / {i['p90']:.1f} / {i['p99']:.1f} | {r.chunks_per_token:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model directory (default %(default)s)")
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--threads", type=int, default=2, help="server kernel threads (default 2)")
    p.add_argument("--slots", type=int, help="server slots (default: the highest concurrency)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts (default 1,4,8,16)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each client asks for (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    p.add_argument("--reps", type=int, default=1, help="rounds per concurrency (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds at the highest concurrency (default 1)")
    p.add_argument("--id-range", type=int, default=32000, help="prompt ids are drawn from [0, this) (default 32000)")
    p.add_argument("--seed", type=int, help="first prompt seed (default: random, so that prompts of an earlier run "
                   "against the same --url server are not prefix-cache hits)")
    p.add_argument("--server-args", default="", help="extra `ternlm serve` flags, e.g. \"--ctx 512\"")
    p.add_argument("--no-synthetic-tokenizer", action="store_true",
                   help="serve a model without tokenizer.json as it is (no content chunks, so no latencies)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args()
    concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]

    def run(url: str) -> list[RoundResult]:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        return bench(url, concurrency, args.prompt_tokens, args.max_tokens, args.reps, args.warmup,
                     args.id_range, seed)

    if args.url:
        results = run(args.url.rstrip("/"))
        setup = {"url": args.url}
    else:
        if not (args.model / "config.json").is_file():
            sys.exit(f"{args.model}: no model there; run `python benchmarks/make_2b4t_shapes.py` first "
                     "(writes bench-models/2b4t-random in about 16 s)")
        setup = {"model": str(args.model), "threads": args.threads, "slots": args.slots or max(concurrency)}
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model
            if not (model / "tokenizer.json").exists() and not args.no_synthetic_tokenizer:
                model = synthetic_tokenizer_dir(model, Path(tmp))
                setup["synthetic_tokenizer"] = True
            with server(model, args.threads, setup["slots"], args.server_args.split()) as url:
                results = run(url)
    setup.update(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, reps=args.reps,
                 cpus=os.cpu_count())
    if args.json:
        print(json.dumps({"setup": setup, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(", ".join(f"{k} {v}" for k, v in setup.items()))
        print(table(results))


if __name__ == "__main__":
    main()
