"""How `ternlm bench` results are shown: the terminal table, the PNG plots and the self-contained HTML report,
all drawn from the JSON document that ``ternlm.bench.run_bench`` returns (schema in ternlm/bench.py)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ternlm.bench import GB, PUBLISHED, PUBLISHED_I2S_VS_F16, SHAPES, fmt
from ternlm.errors import TernlmError


def format_table(results: dict[str, Any]) -> str:
    """The results as a text table (one row per model, engine and thread count) and the speedups."""
    mach, s = results["machine"], results["settings"]
    bw = ", ".join(f"{b['bytes_per_s'] / GB:.1f} GB/s at {b['threads']}T" for b in mach["bandwidth"])
    energy = ("RAPL package energy" if mach["energy_source"] == "rapl" else
              f"ESTIMATE: CPU time x {mach['watts_per_core']} W per core (no RAPL here)")
    lines = [f"machine: {mach['cpu']}, {mach['logical_cpus']} CPUs, {mach['mem_total_bytes'] / 2**30:.0f} GiB, "
             f"kernels {mach['isa']}; memory read bandwidth {bw}; CPUs busy with other work at the start: "
             f"{fmt(mach.get('other_cpu_busy'), '.2f')}",
             f"prefill {s['pp']} tokens, decode {s['tg']} tokens, medians of {s['reps']}; J/token: {energy}", ""]
    head = (f"{'model':8} {'engine':17} {'thr':>3} {'pp tok/s':>9} {'TTFT ms':>8} {'tg tok/s':>8} {'GB/tok':>7} "
            f"{'GB/s':>6} {'% bw':>5} {'RSS GB':>7} {'J/tok':>7} {'x tg':>6} {'x pp':>6}")
    lines += [head, "-" * len(head)]
    for m in results["models"]:
        if m["status"] != "ok":
            lines.append(f"{m['name']:8} skipped: {m['reason']}")
            continue
        ratio = {(x["versus"], x["threads"], x["metric"]): x["ratio"] for x in m["speedups"]}
        for r in m["runs"]:
            if r["status"] == "skipped":
                lines.append(f"{m['name']:8} {r['engine']:17} skipped: {r['reason']}")
                continue
            est = r["status"] == "estimated"
            tg = fmt(r["decode_tok_s"], ".2f") + ("*" if est else "")
            frac, achieved, rss = r["bandwidth_fraction"], r["bandwidth_bytes_per_s"], r["peak_rss_bytes"]
            lines.append(
                f"{m['name']:8} {r['engine']:17} {r['threads']:3d} {fmt(r['prefill_tok_s'], '9.1f')} "
                f"{fmt(r['ttft_s'] and r['ttft_s'] * 1e3, '8.0f')} {tg:>8} "
                f"{r['weight_bytes_per_token'] / GB:7.3f} {fmt(achieved and achieved / GB, '6.1f')} "
                f"{fmt(frac and frac * 100, '5.0f')} {fmt(rss and rss / GB, '7.2f')} "
                f"{fmt(r['joules_per_token'], '7.3f')} "
                f"{fmt(ratio.get((r['engine'], r['threads'], 'decode')), '6.2f')} "
                f"{fmt(ratio.get((r['engine'], r['threads'], 'prefill')), '6.2f')}".rstrip())
    lines += ["", "x tg / x pp: ternlm's decode / prefill speed over that row's engine (same threads).",
              "* bandwidth-bound estimate (best bandwidth of the run / weight bytes per token): an upper bound of that "
              "engine's speed, so the ratio is a lower bound.",
              "GB/s: weight bytes per token x decode tok/s; % bw: of the read bandwidth measured in this run."]
    return "\n".join(lines)


def _points(results: dict[str, Any], engine: str, key: str, threads: int) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for m in results["models"]:
        r = next((r for r in m["runs"] if r["engine"] == engine and r["threads"] == threads and r.get(key)), None)
        if r is not None and m["params"]:
            xs.append(m["params"] / GB)
            ys.append(r[key])
    return xs, ys


def write_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """tokens_per_s.png (decode and prefill tok/s against model size, every engine) and speedup.png
    (ternlm's decode speedups against size, beside the published bitnet.cpp ones). Needs matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        raise TernlmError("plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    threads = max(results["settings"]["threads"])
    engines = list(dict.fromkeys(r["engine"] for m in results["models"] for r in m["runs"]))
    stamp = f"{results['machine']['cpu']}, {threads} threads, {results['created'][:10]}"

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for engine in engines:
            xs, ys = _points(results, engine, key, threads)
            if xs:
                dashed = engine.startswith("baseline") and key == "decode_tok_s" and any(
                    r["status"] == "estimated" for m in results["models"] for r in m["runs"] if r["engine"] == engine)
                ax.plot(xs, ys, "o--" if dashed else "o-", label=engine + (" (* = estimate)" if dashed else ""))
        ax.set(xscale="log", yscale="log", xlabel="ternary parameters (billions)", ylabel="tokens/s",
               title=f"{title} tokens/s")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(stamp, fontsize=8)
    fig.tight_layout()
    paths = [folder / "tokens_per_s.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m_engine in [e for e in engines if e != "ternlm"]:
        xs, ys, est = [], [], []
        for m in results["models"]:
            sp = next((x for x in m["speedups"] if x["versus"] == m_engine and x["metric"] == "decode"
                       and x["threads"] == threads), None)
            if sp and m["params"]:
                xs.append(m["params"] / GB)
                ys.append(sp["ratio"])
                est.append(sp["estimated"])
        if xs:
            line, = ax.plot(xs, ys, "o-", label=f"ternlm / {m_engine} (this machine)")
            if any(est):
                pts = [(x, y) for x, y, e in zip(xs, ys, est, strict=True) if e]
                ax.plot(*zip(*pts, strict=True), "o", mfc="white", color=line.get_color(),
                        label=f"  open: {m_engine} estimated, ratio a lower bound")
    pub = [(SHAPES[n].params / GB, v[1] / v[0]) for n, v in PUBLISHED.items() if v[0] and v[1]]
    ax.plot(*zip(*pub, strict=True), "s:", color="gray", label="bitnet.cpp / llama.cpp, i7-13700H (2410.16144)")
    pub2 = [(SHAPES[n].params / GB, v) for n, v in PUBLISHED_I2S_VS_F16.items()]
    ax.plot(*zip(*pub2, strict=True), "^:", color="black", label="bitnet.cpp I2_S / F16, i7-13700H (2502.11880)")
    ax.set(xscale="log", xlabel="ternary parameters (billions)", ylabel="decode speedup (x)",
           title="ternlm's decode speedup (published: bitnet.cpp's)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(stamp, fontsize=8)
    fig.tight_layout()
    paths.append(folder / "speedup.png")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


def write_html(results: dict[str, Any], path: str | Path, plots: Sequence[Path] = ()) -> Path:
    """A self-contained HTML report: machine, settings, the table, and the plots embedded as base64 PNG."""
    import html

    path = Path(path)
    imgs = "".join(f'<p><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode()}"></p>' for p in plots)
    pub = "".join(f"<tr><td>{n}</td>" + "".join(f"<td>{fmt(x, '.2f')}</td>" for x in v)
                  + f"<td>{fmt(PUBLISHED_I2S_VS_F16.get(n), '.2f')}</td></tr>" for n, v in PUBLISHED.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>ternlm bench</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}pre{{font-size:12px;overflow-x:auto}}
td,th{{padding:2px 8px;text-align:right}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}
</style></head><body><h1>ternlm bench</h1>
<p>{html.escape(results['created'])}, ternlm {html.escape(results['ternlm_version'])}:
<code>{html.escape(results['command'])}</code></p>
<pre>{html.escape(format_table(results))}</pre>{imgs}
<h2>Published decode tok/s on dummy BitNet models (for comparison)</h2>
<table><tr><th>size</th><th>i7-13700H llama.cpp</th><th>i7-13700H bitnet.cpp</th><th>M2 Ultra llama.cpp</th>
<th>M2 Ultra bitnet.cpp</th><th>i7 I2_S vs F16 (x)</th></tr>{pub}</table>
<p>Sources: arXiv 2410.16144 figures; arXiv 2502.11880 figure (I2_S vs Float16).</p>
<h2>Raw results</h2><pre>{html.escape(json.dumps(results, indent=1))}</pre></body></html>"""
    path.write_text(doc)
    return path


# ---- command line ---------------------------------------------------------------------------------


