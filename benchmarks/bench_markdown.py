"""Markdown tables from a `ternlm bench --json` file, for docs/results.md.

    python benchmarks/bench_markdown.py results.json [--threads 2]

One table of speeds per thread count (every engine of every model), one of ternlm's decode speedups beside the
published bitnet.cpp ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ternlm.bench import PUBLISHED, PUBLISHED_I2S_VS_F16

GB = 1e9


def _f(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def speed_table(res: dict[str, Any], threads: int) -> str:
    rows = ["| model | engine | prefill tok/s | TTFT ms | decode tok/s | GB read/token | GB/s | % of bw | "
            "peak RSS GB | J/token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        if m["status"] != "ok":
            rows.append(f"| {m['name']} | skipped: {m['reason']} | | | | | | | | |")
            continue
        for r in m["runs"]:
            if r["status"] == "skipped":
                rows.append(f"| {m['name']} | {r['engine']} | skipped: {r['reason']} | | | | | | | |")
                continue
            if r["threads"] != threads:
                continue
            est = " (estimate)" if r["status"] == "estimated" else ""
            ach, frac, rss = r["bandwidth_bytes_per_s"], r["bandwidth_fraction"], r["peak_rss_bytes"]
            rows.append(f"| {m['name']} | {r['engine']} | {_f(r['prefill_tok_s'])} | "
                        f"{_f(r['ttft_s'] and r['ttft_s'] * 1e3, '.0f')} | {_f(r['decode_tok_s'], '.2f')}{est} | "
                        f"{r['weight_bytes_per_token'] / GB:.3f} | {_f(ach and ach / GB)} | "
                        f"{_f(frac and frac * 100, '.0f')} | {_f(rss and rss / GB, '.2f')} | "
                        f"{_f(r['joules_per_token'], '.3f')} |")
    return "\n".join(rows)


def speedup_table(res: dict[str, Any]) -> str:
    threads = res["settings"]["threads"]
    versus = list(dict.fromkeys(x["versus"] for m in res["models"] for x in m["speedups"]))
    head = "| model | " + " | ".join(f"÷ {v} {t}T" for v in versus for t in threads)
    head += " | published bitnet.cpp ÷ llama.cpp, i7-13700H | published I2_S ÷ F16, i7-13700H |"
    rows = [head, "|" + "---|" * (len(versus) * len(threads) + 3)]
    for m in res["models"]:
        if m["status"] != "ok":
            continue
        sp = {(x["versus"], x["threads"]): x for x in m["speedups"] if x["metric"] == "decode"}
        cells = []
        for v in versus:
            for t in threads:
                x = sp.get((v, t))
                cells.append("–" if x is None else f"{x['ratio']:.2f}×" + (" (≥, est.)" if x["estimated"] else ""))
        pub = PUBLISHED.get(m["name"])
        p1 = f"{pub[1] / pub[0]:.2f}×" if pub and pub[0] and pub[1] else "–"
        p2 = f"{PUBLISHED_I2S_VS_F16[m['name']]:.2f}×" if m["name"] in PUBLISHED_I2S_VS_F16 else "–"
        rows.append(f"| {m['name']} | " + " | ".join(cells) + f" | {p1} | {p2} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    args = ap.parse_args()
    res = json.loads(args.json.read_text())
    for t in res["settings"]["threads"]:
        print(f"\n### {t} thread{'s' if t > 1 else ''}\n")
        print(speed_table(res, t))
    print("\n### Decode speedups\n")
    print(speedup_table(res))


if __name__ == "__main__":
    main()
