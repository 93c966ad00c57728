"""Total cost of ownership: running ternlm on own servers against paying a cloud LLM API per token.

A scenario is a workload (tokens per day, growth), on-premise costs (servers, power, operations) and a dated
price table (`prices.toml`, or the user's). `compute` turns it into monthly and cumulative costs, the
break-even month and the savings at the horizon for each API. Every formula is written out in docs/tco.md;
the code follows it line for line so that a result can be checked by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from ternlm.errors import FormatError, ParamError, TernlmError

SCHEMA = "ternlm.tco/1"
TOKENS_PER_PRICE_UNIT = 1_000_000
MAX_HORIZON_MONTHS = 1200
# Capacity and money comparisons allow for float rounding: exactly-full capacity needs no extra server, and a
# sub-cent difference counts as equal cost.
_CAPACITY_EPS = 1e-9
_MONEY_EPS = 1e-6

# Value rules: (test, the text an error shows after "must be").
_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "nonneg": (lambda v: v >= 0, "≥ 0"),
    "pos": (lambda v: v > 0, "> 0"),
    "share": (lambda v: 0 < v <= 1, "in (0, 1], a fraction (0.7 or 70%)"),
    "growth": (lambda v: -1 < v <= 10, "in (-1, 10], a fraction per year (0.2 or 20% = +20 %/year)"),
    "hours": (lambda v: 0 < v <= 24, "in (0, 24]"),
    "days": (lambda v: 0 < v <= 31, "in (0, 31]"),
    "ge1": (lambda v: v >= 1, "≥ 1"),
}


def _param(kind: type, flag: str, rule: str | tuple[str, ...], help: str, default: Any = dataclasses.MISSING) -> Any:
    """A scenario field: its type, command-line flag, allowed values and help travel with it."""
    return field(default=default, metadata={"kind": kind, "flag": flag, "rule": rule, "help": help})


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the deployment serves: tokens per day in month 1 and how that volume grows."""

    input_tokens_per_day: float = _param(float, "--input-tokens", "nonneg", "input (prompt) tokens per day in month 1")
    output_tokens_per_day: float = _param(float, "--output-tokens", "nonneg", "output tokens per day in month 1")
    growth_per_year: float = _param(float, "--growth", "growth", "volume growth per year, 0.2 or 20%% (default 0)", 0.0)
    compounding: str = _param(str, "--compounding", ("monthly", "yearly"),
                              "monthly: volume × (1+g)^((m-1)/12); yearly: steps once a year (default monthly)",
                              "monthly")
    days_per_month: float = _param(float, "--days-per-month", "days", "billing days per month (default 30)", 30.0)

    def __post_init__(self) -> None:
        _check_fields(self, "workload")

    def factor(self, month: int) -> float:
        """Volume of `month` (1-based) relative to month 1."""
        years = (month - 1) / 12 if self.compounding == "monthly" else (month - 1) // 12
        return (1 + self.growth_per_year) ** years


@dataclass(frozen=True, kw_only=True)
class OnPrem:
    """Costs and capacity of one on-premise server, and how many the workload needs."""

    hardware_cost: float = _param(float, "--hardware-cost", "nonneg", "purchase price of one server")
    setup_cost: float = _param(float, "--setup-cost", "nonneg", "one-off cost in month 1 (install, integration)", 0.0)
    hardware_life_years: float = _param(
        float, "--hardware-life-years", "nonneg",
        "years until a server is bought again (0 = never within the horizon; default 0)", 0.0)
    capex: str = _param(str, "--capex", ("upfront", "depreciate"),
                        "upfront: pay each server when bought; depreciate: hardware_cost / life per month "
                        "(default upfront)", "upfront")
    decode_tokens_per_s: float = _param(float, "--tokens-per-s", "pos",
                                        "output tokens/s one server sustains (aggregate over concurrent requests)")
    prefill_tokens_per_s: float | None = _param(
        float, "--prefill-tokens-per-s", "pos", "input tokens/s one server prefills (default: the decode rate)", None)
    watts: float = _param(float, "--watts", "nonneg", "power of one server at the wall while busy")
    idle_watts: float | None = _param(float, "--idle-watts", "nonneg",
                                      "power of one server while idle (default: watts, i.e. always busy)", None)
    pue: float = _param(float, "--pue", "ge1", "facility power / IT power, for cooling (default 1.0)", 1.0)
    power_price_per_kwh: float = _param(float, "--power-price", "nonneg", "electricity price per kWh")
    utilisation: float = _param(float, "--utilisation", "share",
                                "highest share of capacity to plan for at peak (default 0.7)", 0.7)
    active_hours_per_day: float = _param(float, "--active-hours", "hours",
                                         "hours per day over which the daily tokens arrive (default 24)", 24.0)
    peak_factor: float = _param(float, "--peak-factor", "ge1",
                                "peak rate / average rate within the active hours (default 1)", 1.0)
    min_servers: int = _param(int, "--min-servers", "ge1", "servers to run at least, e.g. 2 for redundancy", 1)
    ops_per_month: float = _param(float, "--ops-per-month", "nonneg",
                                  "fixed operations cost per month (staff time, space, support; default 0)", 0.0)
    ops_per_server_per_month: float = _param(float, "--ops-per-server-per-month", "nonneg",
                                             "operations cost per server per month (default 0)", 0.0)

    def __post_init__(self) -> None:
        _check_fields(self, "onprem")
        if self.prefill_tokens_per_s is None:
            object.__setattr__(self, "prefill_tokens_per_s", self.decode_tokens_per_s)
        if self.idle_watts is None:
            object.__setattr__(self, "idle_watts", self.watts)
        if self.idle_watts > self.watts:
            raise ParamError(f"onprem.idle_watts (--idle-watts) must be ≤ onprem.watts (--watts): "
                             f"got idle {self.idle_watts:g} W > busy {self.watts:g} W (a --bench file sets watts "
                             "from its joules_per_token; give --idle-watts for that machine)")
        if self.hardware_life_years and self.life_months < 1:
            raise ParamError("onprem.hardware_life_years (--hardware-life-years) must be 0 or at least one month "
                             f"(1/12), got {self.hardware_life_years:g}")
        if self.capex == "depreciate" and not self.life_months:
            raise ParamError('onprem.capex = "depreciate" needs onprem.hardware_life_years (--hardware-life-years) '
                             "> 0: the months to spread a server's price over")

    @property
    def life_months(self) -> int:
        return round(self.hardware_life_years * 12)


@dataclass(frozen=True)
class Price:
    """One API's list price per million tokens, and where and when it was read."""

    name: str
    input: float
    output: float
    as_of: str
    provider: str = ""
    source: str = ""


@dataclass(frozen=True)
class PriceTable:
    """API prices by name, all in one currency; `files` are the files they came from."""

    currency: str
    prices: Mapping[str, Price]
    files: tuple[str, ...]


@dataclass(frozen=True)
class Scenario:
    """Everything `compute` needs. `apis` empty means every API in the price table."""

    workload: Workload
    onprem: OnPrem
    prices: PriceTable
    apis: tuple[str, ...] = ()
    horizon_months: int = 36
    title: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        h = self.horizon_months
        if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= MAX_HORIZON_MONTHS:
            raise ParamError(f"horizon_months (--horizon-months) must be a whole number in 1..{MAX_HORIZON_MONTHS}, "
                             f"got {h!r}")
        unknown = [a for a in self.apis if a not in self.prices.prices]
        if unknown:
            raise ParamError(f"apis (--api): unknown API(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(self.prices.prices)}")
        if not self.apis:
            object.__setattr__(self, "apis", tuple(self.prices.prices))


@dataclass(frozen=True)
class OnPremCosts:
    """Per-month on-premise figures, month 1 first; money in the price table's currency."""

    servers: tuple[int, ...]
    peak_demand: tuple[float, ...]
    energy_kwh: tuple[float, ...]
    setup: tuple[float, ...]
    hardware: tuple[float, ...]
    power: tuple[float, ...]
    ops: tuple[float, ...]
    monthly: tuple[float, ...]
    cumulative: tuple[float, ...]


@dataclass(frozen=True)
class CloudCosts:
    """One API's monthly and cumulative cost, and how on-premise compares with it."""

    price: Price
    monthly: tuple[float, ...]
    cumulative: tuple[float, ...]
    break_even_month: int | None
    savings: float
    savings_pct: float | None


@dataclass(frozen=True)
class TcoResult:
    scenario: Scenario
    input_tokens_per_day: tuple[float, ...]
    output_tokens_per_day: tuple[float, ...]
    onprem: OnPremCosts
    cloud: tuple[CloudCosts, ...]

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON types (the `--json` output; keys documented in docs/tco.md)."""
        s = self.scenario
        op = self.onprem
        return {
            "schema": SCHEMA,
            "title": s.title,
            "currency": s.prices.currency,
            "horizon_months": s.horizon_months,
            "notes": list(s.notes),
            "workload": dataclasses.asdict(s.workload),
            "onprem_inputs": dataclasses.asdict(s.onprem),
            "months": list(range(1, s.horizon_months + 1)),
            "input_tokens_per_day": _rounded(self.input_tokens_per_day, 1),
            "output_tokens_per_day": _rounded(self.output_tokens_per_day, 1),
            "onprem": {
                "servers": list(op.servers),
                "peak_demand_servers": _rounded(op.peak_demand, 4),
                "energy_kwh": _rounded(op.energy_kwh, 3),
                "setup": _rounded(op.setup),
                "hardware": _rounded(op.hardware),
                "power": _rounded(op.power),
                "ops": _rounded(op.ops),
                "monthly": _rounded(op.monthly),
                "cumulative": _rounded(op.cumulative),
                "total": round(op.cumulative[-1], 2),
            },
            "cloud": [
                {
                    "api": c.price.name,
                    "provider": c.price.provider,
                    "input_per_mtok": c.price.input,
                    "output_per_mtok": c.price.output,
                    "price_as_of": c.price.as_of,
                    "price_source": c.price.source,
                    "monthly": _rounded(c.monthly),
                    "cumulative": _rounded(c.cumulative),
                    "total": round(c.cumulative[-1], 2),
                    "break_even_month": c.break_even_month,
                    "savings": round(c.savings, 2),
                    "savings_pct": None if c.savings_pct is None else round(c.savings_pct, 2),
                }
                for c in self.cloud
            ],
        }


def _rounded(values: Iterable[float], digits: int = 2) -> list[float]:
    return [round(v, digits) for v in values]


# --- validation ----------------------------------------------------------------------------------------------

def _field_name(section: str, f: dataclasses.Field) -> str:
    return f"{section}.{f.name} ({f.metadata['flag']})"


def _coerce(value: Any, kind: type, name: str, rule: str | tuple[str, ...]) -> Any:
    """`value` as `kind`: numbers from TOML or strings from flags ("1_000_000", "20%"); bools are not numbers."""
    if kind is str:
        if not isinstance(value, str):
            raise ParamError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParamError(f"{name} must be a number, got {value!r}")
    number: float | int = value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        scale = 1.0
        if text.endswith("%") and rule in ("share", "growth"):
            text, scale = text[:-1], 0.01
        try:
            number = float(text) * scale
        except ValueError:
            raise ParamError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ParamError(f"{name} must be a finite number, got {value!r}")
    if kind is int:
        if number != int(number):
            raise ParamError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return float(number)


def _check_fields(obj: Any, section: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        name, rule = _field_name(section, f), f.metadata["rule"]
        value = _coerce(value, f.metadata["kind"], name, rule)
        if isinstance(rule, tuple):
            if value not in rule:
                raise ParamError(f"{name} must be one of {', '.join(rule)}, got {value!r}")
        else:
            test, text = _RULES[rule]
            if not test(value):
                raise ParamError(f"{name} must be {text}, got {value!r}")
        object.__setattr__(obj, f.name, value)


# --- price tables ----------------------------------------------------------------------------------------

def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read {what} ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{path}: not valid TOML ({e})") from e


def _parse_prices(doc: dict[str, Any], source: str) -> tuple[dict[str, Price], str | None, bool]:
    """Prices of one TOML document, its currency (None if unset) and whether it extends the shipped table."""
    unknown = sorted(set(doc) - {"as_of", "currency", "defaults", "api"})
    if unknown:
        raise ParamError(f"{source}: unknown top-level key(s) {', '.join(unknown)} "
                         "(known: as_of, currency, defaults, api)")
    defaults = doc.get("defaults", True)
    if not isinstance(defaults, bool):
        raise ParamError(f"{source}: defaults must be true or false, got {defaults!r}")
    currency = doc.get("currency")
    if currency is not None and (not isinstance(currency, str) or not currency.strip()):
        raise ParamError(f"{source}: currency must be a non-empty string such as \"USD\", got {currency!r}")
    file_date = doc.get("as_of")
    entries = doc.get("api", {})
    if not isinstance(entries, dict):
        raise ParamError(f'{source}: api must be a table of entries ([api."name"])')
    prices: dict[str, Price] = {}
    for name, entry in entries.items():
        where = f"{source}: api {name!r}"
        if not isinstance(entry, dict):
            raise ParamError(f"{where} must be a table with input and output prices")
        unknown = sorted(set(entry) - {"input", "output", "provider", "source", "as_of"})
        if unknown:
            raise ParamError(f"{where}: unknown key(s) {', '.join(unknown)} "
                             "(known: input, output, provider, source, as_of)")
        missing = [k for k in ("input", "output") if k not in entry]
        if missing:
            raise ParamError(f"{where}: missing {' and '.join(missing)} (price per million tokens)")
        values = {}
        for key in ("input", "output"):
            values[key] = _coerce(entry[key], float, f"{where}: {key}", "nonneg")
            if values[key] < 0:
                raise ParamError(f"{where}: {key} must be ≥ 0, got {entry[key]!r}")
        as_of = entry.get("as_of", file_date)
        if not isinstance(as_of, str) or not as_of.strip():
            raise ParamError(f"{where}: no as_of date (set as_of at the top of the file or in the entry): "
                             "prices change, so every price must say when it was read")
        text = {k: entry.get(k, "") for k in ("provider", "source")}
        for key, value in text.items():
            if not isinstance(value, str):
                raise ParamError(f"{where}: {key} must be a string, got {value!r}")
        prices[name] = Price(name, values["input"], values["output"], as_of, text["provider"], text["source"])
    return prices, currency, defaults


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The shipped price table (ternlm/prices.toml), extended or replaced by the TOML file at `path`.

    An entry of the user's file with a shipped name replaces that entry, others are added; `defaults = false`
    in the file drops the shipped entries. A file that extends the shipped table must use its currency.
    """
    text = importlib.resources.files("ternlm").joinpath("prices.toml").read_text(encoding="utf-8")
    prices, currency, _ = _parse_prices(tomllib.loads(text), "ternlm/prices.toml")
    files = ["ternlm/prices.toml"]
    if path is not None:
        extra, extra_currency, defaults = _parse_prices(_read_toml(path, "prices"), str(path))
        if not defaults:
            prices, files = {}, []
            currency = extra_currency or currency
        elif extra_currency is not None and extra_currency != currency:
            raise ParamError(f"{path}: currency {extra_currency!r} differs from the shipped table's {currency!r}; "
                             "convert the prices, or set defaults = false to use only this file")
        prices = {**prices, **extra}
        files.append(str(path))
    if not prices:
        raise ParamError(f"{path}: no prices: the file sets defaults = false and has no [api.\"name\"] entries")
    return PriceTable(str(currency), prices, tuple(files))


# --- scenarios -------------------------------------------------------------------------------------------

EXAMPLE_SCENARIO = """\
# The baseline scenario of the articles that claim on-premise BitNet is "70-94 % cheaper than cloud APIs over
# three years": 1M input + 0.5M output tokens/day, +20 %/year. The on-premise side is one 16-core x86 server;
# its throughputs are estimates scaled from docs/performance.md (2 cores: 96 tok/s decode over 8 streams,
# 146 tok/s prefill), to be replaced by `ternlm bench --json` on your own hardware (--bench).
title = "Article baseline: 1M input + 0.5M output tokens/day, +20 %/year"
horizon_months = 36
apis = ["claude-opus-4", "claude-3.5-sonnet", "gpt-4o", "gpt-4.1", "gemini-1.5-pro",
        "claude-3.5-haiku", "gpt-4o-mini", "gemini-2.0-flash"]

[workload]
input_tokens_per_day = 1_000_000
output_tokens_per_day = 500_000
growth_per_year = 0.20
compounding = "monthly"
days_per_month = 30

[onprem]
hardware_cost = 4000
setup_cost = 1500
hardware_life_years = 5
capex = "upfront"
decode_tokens_per_s = 400
prefill_tokens_per_s = 600
watts = 200
idle_watts = 80
pue = 1.0
power_price_per_kwh = 0.15
utilisation = 0.7
active_hours_per_day = 10
peak_factor = 2
min_servers = 1
ops_per_month = 0
ops_per_server_per_month = 0
"""

_SECTIONS: dict[str, type] = {"workload": Workload, "onprem": OnPrem}
_TOP_KEYS = ("title", "horizon_months", "apis")


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_SECTIONS[section])}


def _flatten(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """A scenario document's values keyed by field name (names are unique across its sections)."""
    unknown = sorted(set(doc) - set(_TOP_KEYS) - set(_SECTIONS))
    if unknown:
        raise ParamError(f"{source}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(_TOP_KEYS)}, [workload], [onprem])")
    values = {k: doc[k] for k in _TOP_KEYS if k in doc}
    for section in _SECTIONS:
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ParamError(f"{source}: {section} must be a table ([{section}])")
        known = _section_fields(section)
        bad = sorted(set(table) - set(known))
        if bad:
            raise ParamError(f"{source}: [{section}] unknown key(s) {', '.join(bad)} (known: {', '.join(known)})")
        values.update(table)
    return values


def bench_runs(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    """The measured ternary runs of a `ternlm bench --json` document (schema ternlm-bench/1), as
    ("model, N threads", run) in file order: `models[*].runs[*]` with engine "ternlm" and status "ok"."""
    models = doc.get("models") if isinstance(doc, dict) else None
    runs = []
    for m in models if isinstance(models, list) else []:
        for r in m.get("runs", []) if isinstance(m, dict) else []:
            if isinstance(r, dict) and r.get("engine") == "ternlm" and r.get("status") == "ok":
                runs.append((f"{m.get('name')}, {r.get('threads')} threads", r))
    return runs


def read_bench(path: str | Path, index: int | None = None) -> dict[str, float]:
    """Server figures from a `ternlm bench --json` file: decode_tokens_per_s, and when present
    prefill_tokens_per_s and watts (= joules_per_token × decode tokens/s).

    Reads the ternary run number `index` of ``bench_runs`` (models[*].runs[*] with engine "ternlm"), by default
    the one with the most threads of the first model: a server uses all its cores.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read the bench file ({e})") from e
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e}); expected the output of `ternlm bench --json`") from e
    runs = bench_runs(doc)
    if not runs:
        raise ParamError(f"{path}: no measured ternlm run (models[*].runs[*] with engine 'ternlm' and status 'ok'); "
                         "expected the output of `ternlm bench --json`, or enter --tokens-per-s")
    if index is None:
        first_model = runs[0][0].rsplit(",", 1)[0]
        same = [i for i, (label, _) in enumerate(runs) if label.rsplit(",", 1)[0] == first_model]
        index = max(same, key=lambda i: runs[i][1].get("threads") or 0)
    elif not 0 <= index < len(runs):
        raise ParamError(f"--bench-result {index} is out of range: {path} has {len(runs)} ternlm run(s)")
    label, run = runs[index]
    where = f"{path}: run {index} ({label})"
    if run.get("decode_tok_s") is None:
        raise ParamError(f"{where} has no decode_tok_s")
    out = {"decode_tokens_per_s": _coerce(run["decode_tok_s"], float, f"{where} decode_tok_s", "pos")}
    if out["decode_tokens_per_s"] <= 0:
        raise ParamError(f"{where}: decode_tok_s must be > 0, got {run['decode_tok_s']!r}")
    if run.get("prefill_tok_s") is not None:
        out["prefill_tokens_per_s"] = _coerce(run["prefill_tok_s"], float, f"{where} prefill_tok_s", "pos")
    if run.get("joules_per_token") is not None:
        jpt = _coerce(run["joules_per_token"], float, f"{where} joules_per_token", "nonneg")
        out["watts"] = jpt * out["decode_tokens_per_s"]
    return out


def build_scenario(*, scenario: str | Path | None = None, example: bool = False, prices: str | Path | None = None,
                   bench: str | Path | None = None, bench_result: int | None = None,
                   overrides: Mapping[str, Any] | None = None) -> Scenario:
    """A validated scenario from, lowest precedence first: the example or a scenario TOML file, a bench file,
    then `overrides` (field name → value, e.g. from flags; None values are ignored)."""
    if example and scenario is not None:
        raise ParamError("give either --example or --scenario, not both")
    notes: list[str] = []
    values: dict[str, Any] = {}
    if example:
        values = _flatten(tomllib.loads(EXAMPLE_SCENARIO), "example scenario")
        notes.append("scenario: the shipped example (ternlm tco --example)")
    elif scenario is not None:
        values = _flatten(_read_toml(scenario, "scenario"), str(scenario))
        notes.append(f"scenario: {scenario}")
    if bench is not None:
        measured = read_bench(bench, bench_result)
        values.update(measured)
        notes.append(f"from {bench}: " + ", ".join(f"{k} = {v:.4g}" for k, v in measured.items()))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    table = load_prices(prices)
    parts = {}
    for section, cls in _SECTIONS.items():
        fields = _section_fields(section)
        missing = [f for f in fields.values() if f.name not in values and f.default is dataclasses.MISSING]
        if missing:
            f = missing[0]
            raise ParamError(f"missing {section}.{f.name}: give {f.metadata['flag']}, or set {f.name} under "
                             f"[{section}] in a --scenario file (or start from --example)")
        parts[section] = cls(**{k: values[k] for k in fields if k in values})
    apis = values.get("apis", ())
    if isinstance(apis, str):
        apis = [apis]
    if not isinstance(apis, (list, tuple)) or not all(isinstance(a, str) for a in apis):
        raise ParamError(f"apis (--api) must be a list of API names, got {apis!r}")
    horizon = values.get("horizon_months", 36)
    if isinstance(horizon, str):
        horizon = _coerce(horizon, int, "horizon_months (--horizon-months)", "ge1")
    title = values.get("title", "")
    if not isinstance(title, str):
        raise ParamError(f"title must be a string, got {title!r}")
    return Scenario(parts["workload"], parts["onprem"], table, tuple(dict.fromkeys(apis)), horizon, title,
                    tuple(notes))


# --- the arithmetic --------------------------------------------------------------------------------------

def _cumsum(values: Iterable[float]) -> tuple[float, ...]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return tuple(out)


def compute(s: Scenario) -> TcoResult:
    """Monthly and cumulative costs of the scenario (formulas: docs/tco.md)."""
    w, p = s.workload, s.onprem
    life = p.life_months
    tin, tout, servers, demand, kwh, setup, hardware, power, ops, bought = ([] for _ in range(10))
    owned = 0
    for m in range(1, s.horizon_months + 1):
        f = w.factor(m)
        tin.append(w.input_tokens_per_day * f)
        tout.append(w.output_tokens_per_day * f)
        busy_s = tin[-1] / p.prefill_tokens_per_s + tout[-1] / p.decode_tokens_per_s
        peak = busy_s / (p.active_hours_per_day * 3600) * p.peak_factor / p.utilisation
        need = max(p.min_servers, math.ceil(peak - _CAPACITY_EPS))
        bought.append(max(0, need - owned))
        owned = max(owned, need)
        servers.append(owned)
        demand.append(peak)
        if p.capex == "depreciate":
            hardware.append(owned * p.hardware_cost / life)
        else:
            refreshed = sum(bought[m - 1 - k * life] for k in range(1, (m - 1) // life + 1)) if life else 0
            hardware.append((bought[-1] + refreshed) * p.hardware_cost)
        setup.append(p.setup_cost if m == 1 else 0.0)
        kwh_day = p.pue * (owned * p.idle_watts * 24 + (p.watts - p.idle_watts) * busy_s / 3600) / 1000
        kwh.append(kwh_day * w.days_per_month)
        power.append(kwh[-1] * p.power_price_per_kwh)
        ops.append(p.ops_per_month + p.ops_per_server_per_month * owned)
    monthly = tuple(a + b + c + d for a, b, c, d in zip(setup, hardware, power, ops, strict=True))
    onprem = OnPremCosts(tuple(servers), tuple(demand), tuple(kwh), tuple(setup), tuple(hardware), tuple(power),
                         tuple(ops), monthly, _cumsum(monthly))
    cloud = []
    for name in s.apis:
        price = s.prices.prices[name]
        cost = tuple(w.days_per_month * (i * price.input + o * price.output) / TOKENS_PER_PRICE_UNIT
                     for i, o in zip(tin, tout, strict=True))
        cum = _cumsum(cost)
        pairs = enumerate(zip(onprem.cumulative, cum, strict=True), 1)
        even = next((m for m, (a, b) in pairs if a <= b + _MONEY_EPS), None)
        saved = cum[-1] - onprem.cumulative[-1]
        cloud.append(CloudCosts(price, cost, cum, even, saved, 100 * saved / cum[-1] if cum[-1] > 0 else None))
    return TcoResult(s, tuple(tin), tuple(tout), onprem, tuple(cloud))


# --- output ----------------------------------------------------------------------------------------------

def _marks(horizon: int) -> list[int]:
    marks = list(range(12, horizon + 1, 12))
    return marks if marks and marks[-1] == horizon else [*marks, horizon]


def _money(v: float) -> str:
    return f"{v:,.0f}"


def format_table(r: TcoResult) -> str:
    """The terminal report: inputs in one paragraph, then cumulative cost at each year end, break-even, savings."""
    s, w, p, op = r.scenario, r.scenario.workload, r.scenario.onprem, r.onprem
    n, cur = s.horizon_months, s.prices.currency
    growth = f"{w.growth_per_year * 100:+g} %/year compounded {w.compounding}" if w.growth_per_year else "no growth"
    dates = sorted({c.price.as_of for c in r.cloud})
    lines = [s.title] if s.title else []
    lines += [
        f"workload  {w.input_tokens_per_day:,.0f} input + {w.output_tokens_per_day:,.0f} output tokens/day in month 1, "
        f"{growth}, {w.days_per_month:g} days/month",
        f"          month {n}: {r.input_tokens_per_day[-1]:,.0f} + {r.output_tokens_per_day[-1]:,.0f} tokens/day",
        f"on-prem   {op.servers[0]} server(s) in month 1, {op.servers[-1]} in month {n}; peak demand "
        f"{op.peak_demand[0]:.2f} → {op.peak_demand[-1]:.2f} servers (planned at {p.utilisation:.0%} utilisation)",
        f"          hardware {_money(p.hardware_cost)}/server ({p.capex}), setup {_money(p.setup_cost)}, power "
        f"{op.power[0]:,.2f}/month in month 1 ({op.energy_kwh[0] / w.days_per_month:.2f} kWh/day at "
        f"{p.power_price_per_kwh:g}/kWh), ops {op.ops[0]:,.0f}/month",
        f"prices    {cur} per million tokens, list prices as of {', '.join(dates)} "
        f"({', '.join(s.prices.files)}); verify before use",
        *(f"note      {note}" for note in s.notes),
        "",
    ]
    marks = _marks(n)
    head = [f"cumulative {cur}", "in/out per 1M", *(f"month {m}" for m in marks), "break-even",
            f"saved by month {n}"]
    rows = [["on-prem (ternlm)", "", *(_money(op.cumulative[m - 1]) for m in marks), "", ""]]
    for c in r.cloud:
        even = f"month {c.break_even_month}" if c.break_even_month else "never"
        pct = "" if c.savings_pct is None else f" ({c.savings_pct:.1f} %)"
        rows.append([c.price.name, f"{c.price.input:g}/{c.price.output:g}",
                     *(_money(c.cumulative[m - 1]) for m in marks), even, _money(c.savings) + pct])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.append("break-even: first month whose cumulative on-prem cost ≤ the API's; never = not within the horizon")
    return "\n".join(lines)


def plot(r: TcoResult, path: str | Path) -> None:
    """Write the cumulative cost curves as a PNG (needs matplotlib; log scale when the totals span > 30×)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise TernlmError("--plot needs matplotlib: pip install matplotlib") from e
    s = r.scenario
    months = range(1, s.horizon_months + 1)
    fig = Figure(figsize=(11, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(months, r.onprem.cumulative, color="black", linewidth=2.5, label="on-prem (ternlm)")
    for c in r.cloud:
        even = f"break-even month {c.break_even_month}" if c.break_even_month else "never breaks even"
        (line,) = ax.plot(months, c.cumulative, linewidth=1.3, label=f"{c.price.name} ({even})")
        if c.break_even_month:
            ax.plot(c.break_even_month, c.cumulative[c.break_even_month - 1], "o", color=line.get_color())
    totals = [r.onprem.cumulative[-1], *(c.cumulative[-1] for c in r.cloud)]
    positive = [t for t in totals if t > 0]
    log = bool(positive) and max(positive) / min(positive) > 30
    if log:
        ax.set_yscale("log")
    dates = ", ".join(sorted({c.price.as_of for c in r.cloud}))
    ax.set_title((s.title + "\n" if s.title else "") + f"cumulative cost, list prices as of {dates}", fontsize=10)
    ax.set_xlabel("month")
    ax.set_ylabel(f"cumulative cost ({s.prices.currency}{', log scale' if log else ''})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise TernlmError(f"cannot write the plot to {path}: {e}") from e


# --- command line ----------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ternlm tco`; `run(args)` reads them."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--example", action="store_true",
                     help="start from the shipped example: the articles' baseline scenario (docs/tco.md)")
    src.add_argument("--scenario", metavar="FILE", help="TOML scenario file ([workload], [onprem], apis, ...)")
    parser.add_argument("--prices", metavar="FILE", help="TOML price file that extends or replaces the shipped one")
    parser.add_argument("--list-prices", action="store_true", help="print the price table and exit")
    parser.add_argument("--show-example", action="store_true",
                        help="print the example scenario as a TOML file to edit, and exit")
    parser.add_argument("--bench", metavar="FILE",
                        help="`ternlm bench --json` output: tokens/s and watts of one server from its results")
    parser.add_argument("--bench-result", type=int, metavar="N",
                        help="which ternlm run of the bench file, in file order (default: the first model's "
                             "run with the most threads)")
    parser.add_argument("--api", action="append", metavar="NAME",
                        help="compare with this API (repeatable; default: the scenario's list, else all)")
    parser.add_argument("--horizon-months", metavar="N", help="months to cover (default 36)")
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]")
        for f in dataclasses.fields(cls):
            rule = f.metadata["rule"]
            metavar = "{" + ",".join(rule) + "}" if isinstance(rule, tuple) else "N"
            group.add_argument(f.metadata["flag"], dest=f.name, metavar=metavar, help=f.metadata["help"])
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also write the cumulative cost curves to a PNG")


def run(args: argparse.Namespace) -> int:
    """`ternlm tco`: compute the scenario the options describe and print it."""
    if args.show_example:
        print(EXAMPLE_SCENARIO, end="")
        return 0
    if args.list_prices:
        table = load_prices(args.prices)
        print(f"{table.currency} per million tokens ({', '.join(table.files)}); verify before use")
        width = max(len(n) for n in table.prices)
        for price in table.prices.values():
            print(f"{price.name.ljust(width)}  {price.input:>7g}  {price.output:>7g}  as of {price.as_of}  "
                  f"{price.provider}  {price.source}")
        return 0
    overrides = {f.name: getattr(args, f.name) for cls in _SECTIONS.values() for f in dataclasses.fields(cls)}
    overrides["apis"] = args.api
    overrides["horizon_months"] = args.horizon_months
    scenario = build_scenario(scenario=args.scenario, example=args.example, prices=args.prices, bench=args.bench,
                              bench_result=args.bench_result, overrides=overrides)
    result = compute(scenario)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_table(result))
    return 0
