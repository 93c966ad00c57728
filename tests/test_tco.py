"""`ternlm tco`: the cost arithmetic against hand-computed cases (constant volume, growth compounding, server
rounding, refresh and depreciation, break-even edge cases), input validation, price files, bench files, and the
JSON, table and plot outputs."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import pytest

from ternlm import tco
from ternlm.errors import FormatError, ParamError
from ternlm.tco import OnPrem, Price, PriceTable, Scenario, Workload, build_scenario, compute, load_prices

# One API at 1 per million input tokens and 2 per million output tokens.
TABLE = PriceTable("USD", {"api": Price("api", 1.0, 2.0, "2025-06")}, ("test",))


def workload(**kw: object) -> Workload:
    """1M input + 0.5M output tokens/day: the API costs 30 × (1 + 1) = 60 per month."""
    return Workload(**{"input_tokens_per_day": 1e6, "output_tokens_per_day": 5e5, **kw})


def onprem(**kw: object) -> OnPrem:
    """One always-busy 100 W server at 0.5/kWh: 2.4 kWh/day, 72 kWh and 36 per 30-day month."""
    base = {"hardware_cost": 1000.0, "setup_cost": 200.0, "decode_tokens_per_s": 1e4, "watts": 100.0,
            "power_price_per_kwh": 0.5}
    return OnPrem(**{**base, **kw})


def scenario(horizon: int = 36, wl: Workload | None = None, op: OnPrem | None = None) -> Scenario:
    return Scenario(wl or workload(), op or onprem(), TABLE, (), horizon)


# --- arithmetic, by hand -------------------------------------------------------------------------------


def test_constant_volume_by_hand() -> None:
    r = compute(scenario())
    api = r.cloud[0]
    assert api.monthly == pytest.approx([60.0] * 36)
    assert api.cumulative[-1] == pytest.approx(2160.0)
    assert r.onprem.servers == (1,) * 36
    assert r.onprem.energy_kwh == pytest.approx([72.0] * 36)
    assert r.onprem.power == pytest.approx([36.0] * 36)
    assert r.onprem.setup == (200.0,) + (0.0,) * 35
    assert r.onprem.hardware == (1000.0,) + (0.0,) * 35
    assert r.onprem.monthly[0] == pytest.approx(1236.0)
    # on-prem 1200 + 36 m against cloud 60 m: equal only at m = 50, beyond this horizon
    assert r.onprem.cumulative[-1] == pytest.approx(1200 + 36 * 36)
    assert api.break_even_month is None
    assert api.savings == pytest.approx(2160 - 2496)
    assert api.savings_pct == pytest.approx(-336 / 2160 * 100)


def test_break_even_counts_the_month_of_equal_cost() -> None:
    api = compute(scenario(horizon=60)).cloud[0]
    assert api.break_even_month == 50  # 1200 + 36 × 50 = 3000 = 60 × 50
    assert api.savings == pytest.approx(60 * 60 - (1200 + 36 * 60))


def test_break_even_in_month_one() -> None:
    r = compute(scenario(op=onprem(hardware_cost=0.0, setup_cost=0.0)))
    assert r.onprem.monthly[0] == pytest.approx(36.0)
    assert r.cloud[0].break_even_month == 1
    assert r.cloud[0].savings_pct == pytest.approx((60 - 36) / 60 * 100)


def test_never_breaks_even_when_running_costs_exceed_the_api() -> None:
    # 36 for power alone against 30 per month of API cost: the gap only widens
    r = compute(scenario(horizon=120, wl=workload(input_tokens_per_day=5e5, output_tokens_per_day=2.5e5)))
    assert r.cloud[0].monthly[0] == pytest.approx(30.0)
    assert r.cloud[0].break_even_month is None
    assert r.cloud[0].savings < 0


def test_monthly_compounding_by_hand() -> None:
    wl = workload(growth_per_year=0.2)
    assert wl.factor(1) == 1.0
    assert wl.factor(7) == pytest.approx(math.sqrt(1.2))
    assert wl.factor(13) == pytest.approx(1.2)
    assert wl.factor(25) == pytest.approx(1.44)
    api = compute(scenario(horizon=24, wl=wl)).cloud[0]
    assert api.monthly[12] == pytest.approx(72.0)
    # geometric series: 60 × (1.2² − 1) / (1.2^(1/12) − 1)
    assert api.cumulative[-1] == pytest.approx(60 * 0.44 / (1.2 ** (1 / 12) - 1))
    assert api.cumulative[-1] == pytest.approx(1724.42, abs=0.01)


def test_yearly_compounding_by_hand() -> None:
    wl = workload(growth_per_year="20%", compounding="yearly")
    assert wl.growth_per_year == pytest.approx(0.2)
    assert [wl.factor(m) for m in (1, 12, 13, 24, 25)] == pytest.approx([1, 1, 1.2, 1.2, 1.44])
    r = compute(scenario(horizon=36, wl=wl))
    assert r.cloud[0].cumulative[-1] == pytest.approx(60 * 12 * (1 + 1.2 + 1.44))
    assert r.output_tokens_per_day[24] == pytest.approx(5e5 * 1.44)


def test_negative_growth_shrinks_volume_but_keeps_the_servers() -> None:
    wl = workload(input_tokens_per_day=0.0, output_tokens_per_day=2.88e6, growth_per_year=-0.5)
    op = onprem(decode_tokens_per_s=100.0, active_hours_per_day=10, peak_factor=2, utilisation=0.8)
    r = compute(scenario(horizon=24, wl=wl, op=op))
    assert r.onprem.servers[0] == 2
    assert r.onprem.peak_demand[-1] < 1
    assert set(r.onprem.servers) == {2}


# Capacity of one server below: 100 tok/s × 10 h × 3600 s × 0.8 utilisation / peak factor 2 = 1,440,000 tokens/day.
SIZED = {"decode_tokens_per_s": 100.0, "active_hours_per_day": 10, "peak_factor": 2, "utilisation": 0.8}


@pytest.mark.parametrize(("tokens", "servers"), [(0.0, 1), (1.44e6, 1), (1.44e6 + 1, 2), (2.88e6, 2), (1e7, 7)])
def test_servers_needed_rounds_up(tokens: float, servers: int) -> None:
    wl = workload(input_tokens_per_day=0.0, output_tokens_per_day=tokens)
    r = compute(scenario(horizon=1, wl=wl, op=onprem(**SIZED)))
    assert r.onprem.peak_demand[0] == pytest.approx(tokens / 1.44e6)
    assert r.onprem.servers == (servers,)
    assert r.onprem.hardware == (servers * 1000.0,)


def test_exactly_full_capacity_needs_no_extra_server_despite_float_rounding() -> None:
    # 100 tok/s × 10 h × 0.7 / 2 = 1,260,000 tokens/day; 0.7 / 0.7 is not exactly 1 in floating point
    op = onprem(**{**SIZED, "utilisation": 0.7})
    wl = workload(input_tokens_per_day=0.0, output_tokens_per_day=1.26e6)
    assert compute(scenario(horizon=1, wl=wl, op=op)).onprem.servers == (1,)


def test_prefill_rate_and_min_servers() -> None:
    # 720,000 input tokens at 200 tok/s = 3600 s, the same load as 360,000 output tokens at 100 tok/s
    wl = workload(input_tokens_per_day=7.2e5, output_tokens_per_day=3.6e5)
    r = compute(scenario(horizon=1, wl=wl, op=onprem(**SIZED, prefill_tokens_per_s=200.0)))
    assert r.onprem.peak_demand[0] == pytest.approx(7200 / 36000 * 2 / 0.8)
    r = compute(scenario(horizon=1, wl=wl, op=onprem(**SIZED)))  # prefill defaults to the decode rate
    assert r.onprem.peak_demand[0] == pytest.approx(10800 / 36000 * 2 / 0.8)
    r = compute(scenario(horizon=1, wl=wl, op=onprem(**SIZED, min_servers=3)))
    assert r.onprem.servers == (3,)


def test_growth_buys_a_server_in_the_month_it_is_needed() -> None:
    # 1e6 × 2^((m−1)/12) exceeds 1.44e6 from (m−1)/12 > log2(1.44) = 0.526, i.e. from month 8
    wl = workload(input_tokens_per_day=0.0, output_tokens_per_day=1e6, growth_per_year=1.0)
    r = compute(scenario(horizon=12, wl=wl, op=onprem(**SIZED)))
    assert r.onprem.servers == (1,) * 7 + (2,) * 5
    assert r.onprem.hardware == (1000.0,) + (0.0,) * 6 + (1000.0,) + (0.0,) * 4


def test_power_with_idle_watts_and_pue_by_hand() -> None:
    # 1,440,000 output tokens at 100 tok/s: 4 busy hours. 1.5 × (50 W × 24 h + 150 W × 4 h) = 2.7 kWh/day
    wl = workload(input_tokens_per_day=0.0, output_tokens_per_day=1.44e6)
    op = onprem(**SIZED, watts=200.0, idle_watts=50.0, pue=1.5, power_price_per_kwh=0.2)
    r = compute(scenario(horizon=1, wl=wl, op=op))
    assert r.onprem.energy_kwh == pytest.approx([81.0])
    assert r.onprem.power == pytest.approx([16.2])


def test_ops_costs() -> None:
    op = onprem(min_servers=2, ops_per_month=100.0, ops_per_server_per_month=10.0)
    assert compute(scenario(horizon=2, op=op)).onprem.ops == pytest.approx([120.0, 120.0])


def test_hardware_refresh_at_end_of_life() -> None:
    r = compute(scenario(horizon=36, op=onprem(hardware_life_years=1)))
    assert [m + 1 for m, h in enumerate(r.onprem.hardware) if h] == [1, 13, 25]
    assert sum(r.onprem.hardware) == 3000.0


def test_depreciation_spreads_the_price_over_the_life() -> None:
    r = compute(scenario(horizon=36, op=onprem(capex="depreciate", hardware_life_years=2, min_servers=2)))
    assert r.onprem.hardware == pytest.approx([2 * 1000 / 24] * 36)
    assert r.onprem.monthly[0] == pytest.approx(200 + 2000 / 24 + 72)  # two servers' power


def test_zero_volume_costs_nothing_in_the_cloud() -> None:
    r = compute(scenario(wl=workload(input_tokens_per_day=0.0, output_tokens_per_day=0.0)))
    assert r.cloud[0].cumulative[-1] == 0.0
    assert r.cloud[0].savings_pct is None
    assert r.cloud[0].break_even_month is None


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: workload(input_tokens_per_day=-1), r"workload\.input_tokens_per_day \(--input-tokens\) must be ≥ 0"),
    (lambda: workload(growth_per_year=20), r"growth_per_year \(--growth\) must be in \(-1, 10\], a fraction"),
    (lambda: workload(growth_per_year=-1), r"growth_per_year"),
    (lambda: workload(compounding="daily"), r"compounding \(--compounding\) must be one of monthly, yearly"),
    (lambda: workload(days_per_month=0), r"days_per_month"),
    (lambda: workload(output_tokens_per_day="lots"), r"output_tokens_per_day \(--output-tokens\) must be a number"),
    (lambda: workload(output_tokens_per_day=True), r"must be a number, got True"),
    (lambda: workload(output_tokens_per_day=float("nan")), r"must be a finite number"),
    (lambda: onprem(utilisation=0), r"onprem\.utilisation \(--utilisation\) must be in \(0, 1\]"),
    (lambda: onprem(utilisation="150%"), r"utilisation"),
    (lambda: onprem(decode_tokens_per_s=0), r"decode_tokens_per_s \(--tokens-per-s\) must be > 0"),
    (lambda: onprem(active_hours_per_day=25), r"active_hours_per_day \(--active-hours\) must be in \(0, 24\]"),
    (lambda: onprem(peak_factor=0.5), r"peak_factor \(--peak-factor\) must be ≥ 1"),
    (lambda: onprem(min_servers=1.5), r"min_servers \(--min-servers\) must be a whole number"),
    (lambda: onprem(idle_watts=150), r"idle_watts \(--idle-watts\) must be ≤ onprem\.watts"),
    (lambda: onprem(capex="depreciate"), r'capex = "depreciate" needs onprem\.hardware_life_years'),
    (lambda: onprem(hardware_life_years=0.01), r"hardware_life_years .* at least one month"),
    (lambda: Scenario(workload(), onprem(), TABLE, (), 0), r"horizon_months \(--horizon-months\) must be"),
    (lambda: Scenario(workload(), onprem(), TABLE, ("gpt-5",)), r"unknown API\(s\) 'gpt-5'; known: api"),
])
def test_bad_inputs_name_the_field(make, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        make()


def test_flag_strings_are_parsed() -> None:
    wl = workload(input_tokens_per_day="1_000_000", growth_per_year="20%")
    assert wl.input_tokens_per_day == 1e6 and wl.growth_per_year == pytest.approx(0.2)
    assert onprem(utilisation="70%", min_servers="2").min_servers == 2


def test_missing_required_field_says_how_to_give_it() -> None:
    with pytest.raises(ParamError, match=r"missing workload\.input_tokens_per_day: give --input-tokens"):
        build_scenario()
    with pytest.raises(ParamError, match=r"missing onprem\.hardware_cost: give --hardware-cost"):
        build_scenario(overrides={"input_tokens_per_day": 1, "output_tokens_per_day": 1})
    with pytest.raises(ParamError, match="either --example or --scenario"):
        build_scenario(example=True, scenario="x.toml")


def test_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('horizon_months = 24\napis = ["gpt-4o"]\n[workload]\ninput_tokens_per_day = 1e6\n'
                    'output_tokens_per_day = 5e5\n[onprem]\nhardware_cost = 1000\ndecode_tokens_per_s = 50\n'
                    'watts = 100\npower_price_per_kwh = 0.2\n')
    s = build_scenario(scenario=path, overrides={"watts": "150", "apis": None})
    assert s.horizon_months == 24 and s.apis == ("gpt-4o",) and s.onprem.watts == 150.0
    assert compute(s).cloud[0].monthly[0] == pytest.approx(30 * (2.5 + 5.0))
    path.write_text("[onprem]\nwats = 100\n")
    with pytest.raises(ParamError, match=r"\[onprem\] unknown key\(s\) wats"):
        build_scenario(scenario=path)
    path.write_text("[workload\n")
    with pytest.raises(FormatError, match="not valid TOML"):
        build_scenario(scenario=path)


# --- prices ------------------------------------------------------------------------------------------------


def test_shipped_prices_are_dated_and_sourced() -> None:
    table = load_prices()
    assert table.currency == "USD" and len(table.prices) >= 10
    assert table.prices["gpt-4o"].input == 2.5 and table.prices["gpt-4o"].output == 10.0
    for p in table.prices.values():
        assert p.as_of and p.source.startswith("https://") and p.provider
        assert 0 < p.input <= p.output


def test_prices_file_overrides_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('as_of = "2026-11-01"\n[api."gpt-4o"]\ninput = 1.0\noutput = 4.0\n'
                    '[api."local-llm"]\ninput = 0.5\noutput = 0.5\nas_of = "2026-10-01"\n')
    table = load_prices(path)
    assert table.prices["gpt-4o"] == Price("gpt-4o", 1.0, 4.0, "2026-11-01")
    assert table.prices["local-llm"].as_of == "2026-10-01"
    assert "claude-opus-4" in table.prices
    assert table.files == ("ternlm/prices.toml", str(path))

    path.write_text('defaults = false\ncurrency = "EUR"\nas_of = "2026-11-01"\n[api.mine]\ninput = 1\noutput = 2\n')
    table = load_prices(path)
    assert list(table.prices) == ["mine"] and table.currency == "EUR" and table.files == (str(path),)


@pytest.mark.parametrize(("text", "message"), [
    ('[api.x]\ninput = 1\noutput = 2\n', r"api 'x': no as_of date"),
    ('as_of = "2026"\n[api.x]\ninput = 1\n', r"api 'x': missing output"),
    ('as_of = "2026"\n[api.x]\ninput = -1\noutput = 2\n', r"api 'x': input must be ≥ 0"),
    ('as_of = "2026"\n[api.x]\ninput = 1\noutput = 2\ncached = 0.5\n', r"unknown key\(s\) cached"),
    ('as_of = "2026"\ncurrency = "EUR"\n[api.x]\ninput = 1\noutput = 2\n', r"currency 'EUR' differs"),
    ('as_of = "2026"\nprice = 3\n', r"unknown top-level key\(s\) price"),
    ('defaults = false\nas_of = "2026"\n', r"no prices"),
])
def test_bad_prices_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ParamError, match=message):
        load_prices(path)


# --- bench files ---------------------------------------------------------------------------------------------


def _run(engine: str, threads: int, decode: float, **more: float) -> dict:
    return {"engine": engine, "threads": threads, "status": "ok", "decode_tok_s": decode, **more}


def test_bench_file_gives_tokens_per_s_and_watts(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"schema": "ternlm-bench/1", "models": [
        {"name": "a", "runs": [_run("ternlm", 1, 30.0), _run("baseline-f16", 2, 5.0),
                               _run("ternlm", 2, 50.0, joules_per_token=2.0, prefill_tok_s=300.0)]},
        {"name": "b", "runs": [_run("ternlm", 2, 20.0), {"engine": "ternlm", "threads": 4, "status": "skipped"}]},
    ]}))
    # by default: the first model's ternlm run with the most threads
    assert tco.read_bench(path) == {"decode_tokens_per_s": 50.0, "prefill_tokens_per_s": 300.0, "watts": 100.0}
    assert tco.read_bench(path, 0) == {"decode_tokens_per_s": 30.0}
    assert tco.read_bench(path, 2) == {"decode_tokens_per_s": 20.0}
    s = build_scenario(example=True, bench=path, overrides={"idle_watts": 40})
    assert (s.onprem.decode_tokens_per_s, s.onprem.watts, s.onprem.idle_watts) == (50.0, 100.0, 40.0)
    assert any("bench.json" in note for note in s.notes)
    with pytest.raises(ParamError, match=r"--bench-result 3 is out of range: .* has 3 ternlm run"):
        tco.read_bench(path, 3)


def test_reads_what_ternlm_bench_writes(tmp_path: Path) -> None:
    from ternlm import bench

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench.run_bench(sizes=["125M"], threads=[1], pp=4, tg=2, reps=1,
                                               baseline_precision=None, progress=False, out=io.StringIO())))
    figures = tco.read_bench(path)
    assert figures["decode_tokens_per_s"] > 0 and figures["prefill_tokens_per_s"] > 0 and figures["watts"] > 0


@pytest.mark.parametrize(("doc", "message"), [
    ({"models": []}, "no measured ternlm run"),
    ([1, 2], "no measured ternlm run"),
    ({"models": [{"name": "a", "runs": [_run("baseline-f16", 1, 3.0)]}]}, "no measured ternlm run"),
    ({"models": [{"name": "a", "runs": [_run("ternlm", 1, 0)]}]}, r"decode_tok_s must be > 0"),
])
def test_bad_bench_file(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ParamError, match=message):
        tco.read_bench(path)


def test_bench_file_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text("tokens/s: 30")
    with pytest.raises(FormatError, match="not valid JSON"):
        tco.read_bench(path)


# --- the example and the outputs ---------------------------------------------------------------------------


def test_example_scenario_figures_in_docs() -> None:
    """The figures docs/tco.md quotes for `ternlm tco --example`."""
    r = compute(build_scenario(example=True))
    by = {c.price.name: c for c in r.cloud}
    assert r.onprem.servers == (1,) * 36
    assert r.onprem.cumulative[-1] == pytest.approx(5832, abs=1)
    assert by["gpt-4o"].monthly[0] == pytest.approx(225.0)  # 30 × (1 × 2.50 + 0.5 × 10.00)
    assert by["gpt-4o"].cumulative[-1] == pytest.approx(10699, abs=1)
    expected = {"claude-opus-4": (4, 92.2), "claude-3.5-sonnet": (16, 61.1), "gpt-4o": (22, 45.5),
                "gpt-4.1": (27, 31.9), "gemini-1.5-pro": (None, -9.0), "gpt-4o-mini": (None, -808.4)}
    for name, (month, pct) in expected.items():
        assert by[name].break_even_month == month, name
        assert by[name].savings_pct == pytest.approx(pct, abs=0.05), name


def test_json_output_shape() -> None:
    r = compute(build_scenario(example=True, overrides={"horizon_months": "30"}))
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["schema"] == "ternlm.tco/1" and doc["currency"] == "USD" and doc["horizon_months"] == 30
    assert doc["months"] == list(range(1, 31))
    assert set(doc["workload"]) == {"input_tokens_per_day", "output_tokens_per_day", "growth_per_year",
                                    "compounding", "days_per_month"}
    assert doc["onprem_inputs"]["prefill_tokens_per_s"] == 600.0
    series = ("servers", "peak_demand_servers", "energy_kwh", "setup", "hardware", "power", "ops", "monthly",
              "cumulative")
    assert set(doc["onprem"]) == {*series, "total"}
    for key in series:
        assert len(doc["onprem"][key]) == 30
    assert all(isinstance(n, int) for n in doc["onprem"]["servers"])
    assert len(doc["input_tokens_per_day"]) == len(doc["output_tokens_per_day"]) == 30
    assert [c["api"] for c in doc["cloud"]] == list(r.scenario.apis)
    keys = {"api", "provider", "input_per_mtok", "output_per_mtok", "price_as_of", "price_source", "monthly",
            "cumulative", "total", "break_even_month", "savings", "savings_pct"}
    for c in doc["cloud"]:
        assert set(c) == keys
        assert len(c["monthly"]) == len(c["cumulative"]) == 30
        assert c["break_even_month"] is None or isinstance(c["break_even_month"], int)
        assert isinstance(c["savings"], float) and isinstance(c["total"], float)
    assert {c["api"]: c["break_even_month"] for c in doc["cloud"]}["gpt-4o-mini"] is None


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ternlm tco")
    tco.add_arguments(parser)
    return tco.run(parser.parse_args(argv))


def test_cli_table_json_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--example", "--api", "gpt-4o", "--api", "gpt-4o-mini", "--growth", "0"]) == 0
    out = capsys.readouterr().out
    assert "no growth" in out and "month 36" in out and "never" in out
    rows = [line for line in out.splitlines() if line.startswith(("on-prem (ternlm)", "gpt-4o"))]
    assert len(rows) == 3
    assert run_cli(["--example", "--json", "--horizon-months", "12"]) == 0
    assert json.loads(capsys.readouterr().out)["horizon_months"] == 12
    assert run_cli(["--list-prices"]) == 0
    assert "claude-3.5-sonnet" in capsys.readouterr().out


def test_cli_rejects_bad_flag_values() -> None:
    with pytest.raises(ParamError, match=r"onprem\.utilisation \(--utilisation\)"):
        run_cli(["--example", "--utilisation", "2"])
    with pytest.raises(ParamError, match=r"horizon_months \(--horizon-months\) must be a whole number"):
        run_cli(["--example", "--horizon-months", "2.5"])


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "tco.png"
    assert run_cli(["--example", "--horizon-months", "12", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_example_writes_a_scenario_file_that_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--show-example"]) == 0
    path = tmp_path / "my.toml"
    path.write_text(capsys.readouterr().out)
    from_file = compute(build_scenario(scenario=path))
    shipped = compute(build_scenario(example=True))
    assert from_file.to_json()["cloud"] == shipped.to_json()["cloud"]
