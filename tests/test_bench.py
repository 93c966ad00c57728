"""`ternlm bench` on a tiny dummy shape: the JSON schema (keys, types, units), skips with reasons, the float
baseline's weights, the GGUF blocks written for llama.cpp, RAPL reading, and the reports. No timing assertions."""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import pytest

from ternlm import bench, bench_report, ternary
from ternlm.baseline import build_baseline, dequantize_rows
from ternlm.kvcache import KVCache
from ternlm.model import Transformer

TINY = bench.Shape("tiny", dim=256, layers=2, heads=4, kv_heads=2, ffn_dim=512, vocab=512, note="test shape")
NUMBER = (int, float)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    return TINY


def _has_llama() -> bool:
    return bench._llama_cpp()[0] is not None


@pytest.fixture(scope="module")
def results():
    """One run: the tiny shape measured by every engine, and 100B skipped for want of memory."""
    mp = pytest.MonkeyPatch()
    mp.setitem(bench.SHAPES, "tiny", TINY)
    mp.setattr(bench, "mem_available", lambda: 8 << 30)  # 100B's 25 GB never fits, whatever the machine
    try:
        yield bench.run_bench(sizes=["tiny", "100B"], threads=[1], pp=8, tg=4, reps=1, llamacpp=True,
                              reserve_gb=1.0, progress=False)
    finally:
        mp.undo()


def test_schema_top_level(results):
    assert results["schema"] == bench.SCHEMA
    assert json.loads(json.dumps(results)) == results  # plain JSON types only
    m = results["machine"]
    assert isinstance(m["cpu"], str) and isinstance(m["logical_cpus"], int)
    assert isinstance(m["other_cpu_busy"], float) and m["other_cpu_busy"] >= 0
    assert m["energy_source"] in ("rapl", "estimate")
    assert (m["watts_per_core"] is None) == (m["energy_source"] == "rapl")
    assert [b["threads"] for b in m["bandwidth"]] == [1]
    assert m["bandwidth"][0]["bytes_per_s"] > 1e8  # bytes/s, not GB/s
    s = results["settings"]
    assert (s["pp"], s["tg"], s["reps"], s["threads"], s["baseline"]) == (8, 4, 1, [1], "f16")
    assert s["llamacpp"] is True and (s["llamacpp_version"] is None) == (s["llamacpp_reason"] is not None)
    assert [x["name"] for x in results["models"]] == ["tiny", "100B"]


def test_measured_model_entries(results):
    tiny = results["models"][0]
    assert tiny["status"] == "ok" and tiny["reason"] is None and tiny["source"] == "dummy"
    assert tiny["params"] == TINY.params
    assert tiny["shape"] == {"dim": 256, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 512, "vocab": 512,
                             "activation": "silu", "note": "test shape"}
    engines = {r["engine"]: r for r in tiny["runs"]}
    expected = {"ternlm", "baseline-f16", "llama.cpp-TQ2_0", "llama.cpp-F16"}
    assert set(engines) == expected
    for name in ("ternlm", "baseline-f16"):
        r = engines[name]
        assert r["status"] == "ok" and r["threads"] == 1 and r["reason"] is None
        for key in ("prefill_tok_s", "ttft_s", "decode_tok_s", "bandwidth_bytes_per_s", "bandwidth_fraction",
                    "build_s"):
            assert isinstance(r[key], NUMBER) and r[key] > 0, key
        for key in ("joules_per_token", "cpu_s_per_token"):  # joules and CPU seconds; a tiny step may read 0
            assert isinstance(r[key], NUMBER) and r[key] >= 0, key
        assert isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] > 1 << 20  # bytes
        assert (r["prefill_tokens"], r["decode_tokens"]) == (8, 4)
        assert r["ttft_s"] == pytest.approx(8 / r["prefill_tok_s"])  # seconds for the whole prompt
        assert r["bandwidth_bytes_per_s"] == pytest.approx(r["weight_bytes_per_token"] * r["decode_tok_s"])
        assert r["energy_source"] == results["machine"]["energy_source"]
    # ternary weights are 2 bits, the head Q8_0; the baseline holds the same weights in float16
    t, f = engines["ternlm"]["weight_bytes_per_token"], engines["baseline-f16"]["weight_bytes_per_token"]
    norms = 4 * (TINY.layers * (3 * TINY.dim + TINY.ffn_dim) + TINY.dim)
    assert t == TINY.params // 4 + bench.q8_head_bytes(TINY) + norms
    assert f == 2 * (TINY.params + TINY.vocab * TINY.dim) + norms
    for name in ("llama.cpp-TQ2_0", "llama.cpp-F16"):
        r = engines[name]
        if _has_llama():
            assert r["status"] == "ok" and r["decode_tok_s"] > 0
        else:
            assert r["status"] == "skipped" and "llama-cpp-python" in r["reason"]
    speedups = {(x["metric"], x["versus"], x["threads"]) for x in tiny["speedups"]}
    assert ("decode", "baseline-f16", 1) in speedups and ("prefill", "baseline-f16", 1) in speedups
    assert all(isinstance(x["ratio"], float) and x["estimated"] is False for x in tiny["speedups"])


def test_skipped_size_has_a_reason(results):
    big = results["models"][1]
    assert big["status"] == "skipped" and big["runs"] == [] and big["speedups"] == []
    assert "does not fit" in big["reason"] and "GB" in big["reason"]
    assert big["params"] == bench.SHAPES["100B"].params and big["shape"]["dim"] == 8192


def test_baseline_too_big_is_estimated(tiny, monkeypatch):
    need = bench.ternary_bytes(TINY) + bench.q8_head_bytes(TINY) + (512 << 20)
    monkeypatch.setattr(bench, "mem_available", lambda: need + (1 << 30) + 4096)  # ternary fits, f16 does not
    res = bench.run_bench(sizes=["tiny"], threads=[1], pp=4, tg=2, reps=1, reserve_gb=(1 << 30) / 1e9,
                          progress=False)
    runs = res["models"][0]["runs"]
    skipped = [r for r in runs if r["engine"] == "baseline-f16" and r["status"] == "skipped"]
    estimated = [r for r in runs if r["engine"] == "baseline-f16" and r["status"] == "estimated"]
    assert len(skipped) == 1 and "needs" in skipped[0]["reason"] and skipped[0]["threads"] is None
    assert len(estimated) == 1 and estimated[0]["threads"] == 1 and "estimate" in estimated[0]["reason"]
    probe, best = res["machine"]["bandwidth"][0]["bytes_per_s"], estimated[0]["bandwidth_bytes_per_s"]
    ternlm = next(r for r in runs if r["engine"] == "ternlm")
    assert best == max(probe, ternlm["bandwidth_bytes_per_s"])  # the best read of the run bounds the baseline
    assert estimated[0]["decode_tok_s"] == pytest.approx(best / estimated[0]["weight_bytes_per_token"])
    assert estimated[0]["prefill_tok_s"] is None
    sp = [x for x in res["models"][0]["speedups"] if x["versus"] == "baseline-f16"]
    assert [(x["metric"], x["estimated"]) for x in sp] == [("decode", True)]


def test_dummy_codes_are_valid():
    w = bench.dummy_weights(TINY)
    for lw in w.layers:
        for lin in lw.linears():
            assert ternary.unpack_codes(lin.packed, lin.in_features).max() <= 2
    assert w.head.q.min() >= -127 and w.head is w.embed


@pytest.mark.parametrize("precision", ["f16", "bf16", "f32"])
def test_baseline_holds_the_same_weights(precision):
    config = TINY.config(64)
    w = bench.dummy_weights(TINY)
    lin = w.layers[0].gate_up
    values = (lin.codes().astype(np.float32) - 1) * np.float32(lin.scale)
    got = dequantize_rows(lin, 0, lin.out_features, precision)
    got = ternary.bf16_to_f32(got) if precision == "bf16" else got.astype(np.float32)
    np.testing.assert_array_equal(got, values)  # scales are float16-exact, so every precision holds them
    t = build_baseline(config, w, precision)
    cache = KVCache(config, 16)
    logits = t.forward(np.arange(6), cache, 0)
    assert logits.shape == (6, TINY.vocab) and np.all(np.isfinite(logits))
    ternary_logits = Transformer(config, w).forward(np.arange(6), KVCache(config, 16), 0)
    # the ternary engine quantizes activations to int8: close to the float baseline, not equal
    assert np.corrcoef(logits.ravel(), ternary_logits.ravel())[0, 1] > 0.95


def test_energy_meter_reads_rapl_with_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("999000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    sub = tmp_path / "intel-rapl:0:0"  # a core sub-zone: counted in the package already
    sub.mkdir()
    (sub / "energy_uj").write_text("5\n")
    (sub / "max_energy_range_uj").write_text("10\n")
    meter = bench.EnergyMeter(root=str(tmp_path))
    assert meter.source == "rapl" and len(meter.zones) == 1
    start = meter.read()
    (zone / "energy_uj").write_text("1000000\n")  # wrapped: 1 J to the top, 1 J after
    joules, cpu = meter.joules(start, meter.read())
    assert joules == pytest.approx(2.0) and cpu >= 0
    none = bench.EnergyMeter(watts_per_core=10.0, root=str(tmp_path / "absent"))
    assert none.source == "estimate"
    assert none.joules(([], 1.0), ([], 1.5))[0] == pytest.approx(5.0)


def test_reports(results, tmp_path):
    table = bench_report.format_table(results)
    assert "tiny" in table and "100B" in table and "skipped" in table and "ternlm" in table
    plots = []
    with contextlib.suppress(bench.TernlmError):  # no matplotlib: the HTML report carries the table alone
        plots = bench_report.write_plots(results, tmp_path / "img")
    html = bench_report.write_html(results, tmp_path / "r.html", plots).read_text()
    assert html.count("data:image/png;base64,") == len(plots)
    assert "<script" not in html and "http" not in html.split("<body>")[0]


def test_arguments():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args(["--sizes", "125M,7B", "--threads", "1,2", "--llamacpp", "--json", "x.json"])
    assert a.sizes == ["125M", "7B"] and a.threads == [1, 2] and a.llamacpp and a.json_path == "x.json"
    assert a.model == [] and a.baseline == "f16"
    assert p.parse_args(["--sizes", "all"]).sizes == list(bench.SHAPES)
    with pytest.raises(SystemExit):
        p.parse_args(["--sizes", "12B"])


def test_bad_arguments(tiny):
    with pytest.raises(bench.ParamError):
        bench.run_bench(sizes=["12B"], progress=False)
    with pytest.raises(bench.ParamError):
        bench.run_bench(sizes=["tiny"], baseline_precision="int4", progress=False)
