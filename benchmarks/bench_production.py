"""Production load test: two `ternlm serve` processes behind nginx on loopback, 32 concurrent clients.

    .venv/bin/python benchmarks/bench_production.py [--model DIR] [--clients 32] [--seconds 30] [--limit-seconds 20]

Starts a redis-server (the rate limits the processes share), two `ternlm serve` processes (`--threads 1` each,
each with its own audit log recording content, response cache off so every request runs the model) and nginx
(Debian package) with the shipped deploy/nginx/ternlm.conf pointed at them. Then, through nginx's port:

A. throughput: every client sends POST /v1/completions back to back (every --stream-every-th one streamed) with
   a key that has no limits, for --seconds. Prints requests/s, completion tokens/s, latency percentiles, status
   codes and how the processes split the work. Checks: no 5xx, and every request completed (HTTP 200 with its
   whole body; a stream counts only once `data: [DONE]` arrived).
B. limits: the clients hammer with a key limited to --rpm requests per minute. Its bucket lives in Redis, starts
   full and refills continuously, so whichever process answers, at most rpm + rpm * minutes requests may pass.
   Checks: that bound, no 5xx, and Retry-After plus x-ratelimit-* headers on every 429.
C. audit: after both processes stopped gracefully, both logs verify; every request a client saw complete appears
   exactly once across the two logs (found by its unique prompt) with status 200, the same completion text and
   token count; every 429 appears with status 429.

Streaming clients read each response to its end; --close-at-done makes them stop at `data: [DONE]` and close the
connection instead, as the synchronous OpenAI Python client does.

Exits 1 if a check fails. Servers, nginx, Redis and the clients all share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

import ternlm
from ternlm.audit import AuditLog, VerifyResult, load_secret
from ternlm.keys import KeyStore
from ternlm.server import serve_subprocess

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "ternlm.conf"
SHIPPED_BACKENDS = ("127.0.0.1:8081", "127.0.0.1:8082")
MODEL_NAME = "bench"  # served as --model-name, so any --model DIR answers to the same id
ROUTE = "/v1/completions"


@dataclass
class Outcome:
    """What one client saw of one request."""

    prompt: str
    stream: bool
    status: int = 0  # 0: no HTTP answer (a transport error)
    latency: float = 0.0  # seconds from sending to the last byte
    end: float = 0.0  # perf_counter() at the last byte
    done: bool = False  # the whole body arrived: JSON parsed, or `data: [DONE]` of a stream without an error chunk
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Setup:
    """The knobs of one run, from the command line."""

    model: Path | None
    clients: int
    seconds: float
    limit_seconds: float
    rpm: int
    tpm: int | None
    max_tokens: int
    stream_every: int
    slots: int
    queue_size: int
    close_at_done: bool
    workdir: Path


# -- processes: redis-server, two ternlm servers, nginx ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program(name: str, package: str) -> str:
    """The path of a Debian-packaged program; /usr/sbin is often missing from a normal user's PATH."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        sys.exit(f"{name} not found (apt-get install {package})")
    return path


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (a graceful stop for all three programs), SIGKILL if it takes longer than `timeout`."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server without persistence on a free loopback port; yields its URL."""
    exe = program("redis-server", "redis-server")
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


def serve_args(setup: Setup, keys_db: Path, redis_url: str, audit_db: Path) -> list[str]:
    model = [str(setup.model)] if setup.model else []
    return [*model, "--model-name", MODEL_NAME, "--threads", "1", "--slots", str(setup.slots),
            "--queue-size", str(setup.queue_size), "--log-level", "warning", "--keys-db", str(keys_db),
            "--redis-url", redis_url, "--audit-db", str(audit_db), "--audit-content", "--response-cache", "0"]


def nginx_site(listen: int, backends: list[int], workdir: Path) -> str:
    """deploy/nginx/ternlm.conf on loopback ports: its plain-HTTP server block only, no IPv6, logs in workdir."""
    head, *servers = NGINX_CONF.read_text(encoding="utf-8").split("\nserver {")
    plain = [s for s in servers if not re.search(r"listen \d+ ssl", s)]
    if len(plain) != 1 or any(b not in head for b in SHIPPED_BACKENDS):
        raise RuntimeError(f"{NGINX_CONF}: expected one plain-HTTP server block and upstreams {SHIPPED_BACKENDS}")
    text = head + "\nserver {" + plain[0]
    for shipped, port in zip(SHIPPED_BACKENDS, backends, strict=True):
        text = text.replace(shipped, f"127.0.0.1:{port}")
    text = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", text)
    text = re.sub(r"listen \d+;", f"listen 127.0.0.1:{listen};", text)
    return text.replace("/var/log/nginx/", f"{workdir}/")


@contextlib.contextmanager
def nginx(backends: list[int], workdir: Path) -> Iterator[str]:
    """nginx in the foreground (`daemon off`) with a prefix of its own; yields its base URL."""
    exe = program("nginx", "nginx")
    listen = free_port()
    (workdir / "ternlm.conf").write_text(nginx_site(listen, backends, workdir), encoding="utf-8")
    temp_paths = "".join(f"    {kind}_temp_path {workdir}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (workdir / "nginx.conf").write_text(
        f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n{temp_paths}    access_log off;\n    include {workdir}/ternlm.conf;\n}}\n", encoding="utf-8")
    proc = subprocess.Popen([exe, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 10.0
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start; see {workdir / 'error.log'}")
            time.sleep(0.05)
        yield url
    finally:
        stop(proc)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


# -- clients ------------------------------------------------------------------------------------------------------

async def send(client: httpx.AsyncClient, url: str, key: str, prompt: str, stream: bool, setup: Setup) -> Outcome:
    """One completion; what came back, including the rate-limit headers."""
    body: dict[str, Any] = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": setup.max_tokens, "temperature": 0,
                            "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    out, start = Outcome(prompt, stream), time.perf_counter()
    try:
        async with client.stream("POST", url + ROUTE, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            out.status = r.status_code
            out.headers = {k: v for k, v in r.headers.items() if k == "retry-after" or k.startswith("x-ratelimit-")}
            if r.status_code != 200:
                await r.aread()
            elif stream:
                await read_events(r, out, setup.close_at_done)
            else:
                read_json(json.loads(await r.aread()), out)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.end = time.perf_counter()
    out.latency = out.end - start
    return out


def read_json(data: dict[str, Any], out: Outcome) -> None:
    out.text = data["choices"][0]["text"]
    out.prompt_tokens, out.completion_tokens = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
    out.done = True


async def read_events(r: httpx.Response, out: Outcome, close_at_done: bool) -> None:
    """Read the SSE stream to its end, so the connection can be reused; or, like the OpenAI Python SDK, stop at
    `data: [DONE]` and close the connection."""
    parts, failed = [], False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            out.done = not failed
            if close_at_done:
                break
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            failed, out.error = True, f"stream error: {chunk['error']}"
        parts.extend(c.get("text", "") for c in chunk.get("choices", ()))
        usage = chunk.get("usage")
        if usage:
            out.prompt_tokens, out.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    out.text = "".join(parts)


async def client_loop(client: httpx.AsyncClient, url: str, key: str, tag: str, c: int, deadline: float,
                      setup: Setup, results: list[Outcome]) -> None:
    """Requests back to back until the deadline; prompts are unique so the audit logs can be matched."""
    i = 0
    while time.perf_counter() < deadline:
        stream = setup.stream_every > 0 and (i + c) % setup.stream_every == 0
        results.append(await send(client, url, key, f"{tag} c{c:02d} r{i:05d}", stream, setup))
        i += 1


async def run_phase(url: str, key: str, tag: str, seconds: float, setup: Setup) -> tuple[list[Outcome], float]:
    """All clients for `seconds`; requests in flight at the deadline are finished. Returns them and the wall time."""
    results: list[Outcome] = []
    limits = httpx.Limits(max_connections=setup.clients, max_keepalive_connections=setup.clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, url, key, tag, c, start + seconds, setup, results)
                               for c in range(setup.clients)))
    return results, max(o.end for o in results) - start


# -- figures and checks -------------------------------------------------------------------------------------------

def status_histogram(results: list[Outcome]) -> str:
    counts = Counter("error" if o.status == 0 else f"{o.status}" + ("" if o.done or o.status != 200 else " cut")
                     for o in results)
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def percentiles_ms(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p90, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 90, 99])
    return f"{p50:.0f} / {p90:.0f} / {p99:.0f}"


def backend_split(logs: list[list[dict[str, Any]]], tag: str) -> str:
    counts = [sum(1 for r in records if r["status"] == 200 and (r.get("prompt") or "").startswith(tag + " "))
              for records in logs]
    total = sum(counts) or 1
    return ", ".join(f"process {i + 1}: {n} ({100.0 * n / total:.1f} %)" for i, n in enumerate(counts))


def server_errors(results: list[Outcome]) -> list[Outcome]:
    return [o for o in results if o.status >= 500]


def phase_a(results: list[Outcome], wall: float, logs: list[list[dict[str, Any]]]) -> list[Check]:
    done = [o for o in results if o.completed]
    tokens = sum(o.completion_tokens for o in done)
    streamed = sum(o.stream for o in done)
    print(f"  requests completed       {len(done)} ({len(done) - streamed} JSON + {streamed} streamed) "
          f"in {wall:.1f} s")
    print(f"  throughput               {len(done) / wall:.1f} req/s, {tokens / wall:.0f} completion tok/s")
    print(f"  latency ms p50/p90/p99   {percentiles_ms([o.latency for o in done])} (all), "
          f"{percentiles_ms([o.latency for o in done if o.stream])} (streamed)")
    print(f"  status codes             {status_histogram(results)}")
    print(f"  per process (audit 200s) {backend_split(logs, 'load')}")
    failed = [o for o in results if not o.completed]
    return [Check("A: zero 5xx", not server_errors(results), f"{len(server_errors(results))} of {len(results)}"),
            Check("A: every request completed", not failed,
                  f"{len(done)} of {len(results)}" + (f"; first failure: {describe(failed[0])}" if failed else ""))]


def describe(o: Outcome) -> str:
    return f"{o.prompt!r} status {o.status} done {o.done} {o.error}".strip()


def phase_b(results: list[Outcome], wall: float, setup: Setup, logs: list[list[dict[str, Any]]]) -> list[Check]:
    allowed = [o for o in results if o.completed]
    limited = [o for o in results if o.status == 429]
    bound = setup.rpm + setup.rpm * wall / 60.0
    # A full bucket admits rpm requests at once, fewer when the token bucket holds less than rpm requests' worth.
    per_request = max((o.prompt_tokens + setup.max_tokens for o in allowed), default=1)
    burst = min(setup.rpm, setup.tpm // per_request) if setup.tpm else setup.rpm
    print(f"  requests sent            {len(results)} in {wall:.1f} s ({len(results) / wall:.0f} req/s)")
    print(f"  status codes             {status_histogram(results)}")
    print(f"  allowed (200)            {len(allowed)}; bound rpm + rpm * minutes = {setup.rpm} + {setup.rpm} * "
          f"{wall / 60.0:.3f} = {bound:.1f}")
    print(f"  per process (audit 200s) {backend_split(logs, 'limit')}")
    bad_429 = [o for o in limited if not headers_ok(o, setup)]
    checks = [Check(f"B: requests allowed <= {bound:.1f} (rpm {setup.rpm})", len(allowed) <= bound,
                    f"{len(allowed)} allowed"),
              Check(f"B: the full bucket's burst passes (>= {burst})", len(allowed) >= burst,
                    f"{len(allowed)} allowed"),
              Check("B: zero 5xx", not server_errors(results), f"{len(server_errors(results))} of {len(results)}"),
              Check("B: every answer is a whole 200 or a 429", len(allowed) + len(limited) == len(results),
                    f"{len(allowed) + len(limited)} of {len(results)}"),
              Check("B: every 429 has Retry-After and x-ratelimit-*", bool(limited) and not bad_429,
                    f"{len(limited) - len(bad_429)} of {len(limited)}")]
    if setup.tpm:
        used = sum(o.prompt_tokens + setup.max_tokens for o in allowed)
        tpm_bound = setup.tpm + setup.tpm * wall / 60.0
        print(f"  tokens allowed           {used}; bound {tpm_bound:.0f}")
        checks.append(Check(f"B: tokens allowed <= {tpm_bound:.0f} (tpm {setup.tpm})", used <= tpm_bound, str(used)))
    return checks


def headers_ok(o: Outcome, setup: Setup) -> bool:
    retry = o.headers.get("retry-after", "")
    return retry.isdigit() and int(retry) >= 1 and o.headers.get("x-ratelimit-limit-requests") == str(setup.rpm)


# -- the audit logs -----------------------------------------------------------------------------------------------

def read_audit(db: Path) -> tuple[VerifyResult, list[dict[str, Any]]]:
    with AuditLog(db, load_secret(Path(f"{db}.secret"))) as log:
        return log.verify(), list(log.records())


def audit_index(logs: list[list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The records of the completions route by prompt (unique per request), over both processes."""
    index: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for records in logs:
        for r in records:
            if r["route"] == ROUTE:
                index[r.get("prompt") or ""].append(r)
    return index


def audit_problem(o: Outcome, found: list[dict[str, Any]]) -> str | None:
    """Why the records of a request the client saw answered (200 or 429) do not match what it saw, or None."""
    matching = [r for r in found if r["status"] == o.status]
    if len(matching) != 1:
        return f"{len(matching)} records with status {o.status} (statuses found: {[r['status'] for r in found]})"
    r = matching[0]
    if o.status == 200 and (r.get("completion") != o.text or r["completion_tokens"] != o.completion_tokens):
        return (f"record says {r['completion_tokens']} tokens {r.get('completion')!r}, "
                f"client got {o.completion_tokens} tokens {o.text!r}")
    if r.get("extra") and r["extra"].get("incomplete"):
        return "record marked incomplete"
    return None


def check_audit(results: list[Outcome], verified: list[VerifyResult], logs: list[list[dict[str, Any]]]) -> list[Check]:
    index = audit_index(logs)
    answered = [o for o in results if o.completed or o.status == 429]
    problems = [(o, p) for o in answered if (p := audit_problem(o, index.get(o.prompt, []))) is not None]
    seen = {o.prompt: o for o in answered}
    unexplained = [r for recs in index.values() for r in recs
                   if r.get("prompt") not in seen or r["status"] != seen[r["prompt"]].status]
    total = [len(records) for records in logs]
    on_route = sum(len(recs) for recs in index.values())
    print(f"  records                  {' + '.join(map(str, total))} = {sum(total)}: {on_route} of {ROUTE} "
          f"(clients sent {len(results)}), {sum(total) - on_route} readiness probes")
    print("  verify                   " + "; ".join(
        f"process {i + 1}: {'ok' if v.ok else 'FAILED at ' + str(v.first_bad)}, {v.reason}"
        for i, v in enumerate(verified)))
    statuses = Counter(r["status"] for recs in index.values() for r in recs)
    print(f"  by status ({ROUTE})  {dict(sorted(statuses.items()))}")
    print(f"  unmatched records        {len(unexplained)} (no client saw that prompt answered with that status)")
    for o, p in problems[:5]:
        print(f"    {describe(o)}: {p}")
    bad_200 = [o for o, _ in problems if o.status == 200]
    ok_200 = sum(1 for o in answered if o.status == 200) - len(bad_200)
    ok_429 = sum(1 for o in answered if o.status == 429) - sum(1 for o, _ in problems if o.status == 429)
    return [Check("C: both audit logs verify", all(v.ok for v in verified),
                  "; ".join(v.reason or f"{v.records} records" for v in verified)),
            Check("C: every completed request audited once, same text", not bad_200,
                  f"{ok_200} of {sum(o.status == 200 for o in answered)}"
                  + (f"; {sum(o.stream for o in bad_200)} of the {len(bad_200)} others streamed" if bad_200 else "")),
            Check("C: every 429 audited once as 429", not any(o.status == 429 for o, _ in problems),
                  f"{ok_429} of {sum(o.status == 429 for o in answered)}")]


# -- logs of the processes ----------------------------------------------------------------------------------------

def nginx_figures(access_log: Path) -> list[Check]:
    """Requests nginx passed on a second time (after an error or 503) and the errors in its own log."""
    lines = access_log.read_text(errors="replace").splitlines() if access_log.exists() else []
    retried = [line for line in lines if re.search(r"upstream_status=\S+, ", line)]
    statuses = Counter(m.group(1) for line in lines if (m := re.search(r"\" (\d{3}) ", line)))
    errors = error_lines(access_log.parent / "error.log", r"\[(error|crit|alert|emerg)\]")
    print(f"  nginx access log         {len(lines)} requests, statuses {dict(sorted(statuses.items()))}, "
          f"{len(retried)} passed to the other process")
    return [Check("nginx: no error in its error log", not errors, errors[0] if errors else "0 lines")]


def error_lines(path: Path, pattern: str) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def server_log_checks(logs: list[Path]) -> list[Check]:
    errors = [line for log in logs for line in error_lines(log, r"ERROR|Traceback|CRITICAL")]
    return [Check("servers: no error in their logs", not errors, errors[0][:200] if errors else "0 lines")]


# -- the run ------------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}; Linux {platform.release()}; "
            f"Python {platform.python_version()}; ternlm {ternlm.__version__}; nginx {nginx_version}; "
            f"redis {redis_version.removeprefix('v=')}")


def make_keys(path: Path, setup: Setup) -> tuple[str, str]:
    """An unlimited key for phase A and a limited one for phase B (created before the servers start)."""
    with KeyStore(path) as store:
        return (store.create("load", "user")[0],
                store.create("limited", "user", rpm=setup.rpm, tpm=setup.tpm)[0])


def run(setup: Setup) -> tuple[list[Outcome], float, list[Outcome], float, list[Path]]:
    """Both phases against two servers behind nginx; everything is stopped (gracefully) when it returns."""
    work = setup.workdir
    load_key, limited_key = make_keys(work / "keys.db", setup)
    audits = [work / f"audit-{i + 1}.db" for i in range(2)]
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(work))
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            log = stack.enter_context(open(work / f"server-{i + 1}.log", "w"))
            stack.enter_context(serve_subprocess(serve_args(setup, work / "keys.db", redis_url, audits[i]),
                                                 120.0, log, port))
        url = stack.enter_context(nginx(ports, work))
        print(f"phase A: {setup.clients} clients for {setup.seconds:.0f} s ...", file=sys.stderr)
        load, load_wall = asyncio.run(run_phase(url, load_key, "load", setup.seconds, setup))
        print(f"phase B: {setup.clients} clients for {setup.limit_seconds:.0f} s at rpm {setup.rpm} ...",
              file=sys.stderr)
        limited, limited_wall = asyncio.run(run_phase(url, limited_key, "limit", setup.limit_seconds, setup))
    return load, load_wall, limited, limited_wall, audits


def report(setup: Setup, phases: tuple[list[Outcome], float, list[Outcome], float, list[Path]]) -> list[Check]:
    load, load_wall, limited, limited_wall, audits = phases
    audit = [read_audit(db) for db in audits]
    logs = [records for _, records in audit]
    print(f"\nPhase A: throughput, key without limits, {setup.seconds:.0f} s")
    checks = phase_a(load, load_wall, logs)
    print(f"\nPhase B: rate limit shared by both processes, rpm {setup.rpm}"
          + (f", tpm {setup.tpm}" if setup.tpm else "") + f", {setup.limit_seconds:.0f} s")
    checks += phase_b(limited, limited_wall, setup, logs)
    print("\nAudit (after a graceful stop)")
    checks += check_audit(load + limited, [v for v, _ in audit], logs)
    print("\nLogs")
    checks += nginx_figures(setup.workdir / "ternlm.access.log")
    checks += server_log_checks([setup.workdir / f"server-{i + 1}.log" for i in range(2)])
    return checks


def summary(checks: list[Check]) -> bool:
    print("\n| check | result | detail |\n|---|---|---|")
    for c in checks:
        print(f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |")
    ok = all(c.ok for c in checks)
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(c.ok for c in checks)} of {len(checks)} checks passed")
    return ok


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="model directory (default: the small model shipped with ternlm)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--seconds", type=float, default=30.0, help="phase A duration (default 30)")
    p.add_argument("--limit-seconds", type=float, default=20.0, help="phase B duration (default 20)")
    p.add_argument("--rpm", type=int, default=30, help="requests per minute of phase B's key (default 30)")
    p.add_argument("--tpm", type=int, help="tokens per minute of phase B's key (default: none)")
    p.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request (default 16)")
    p.add_argument("--stream-every", type=int, default=4, help="every Nth request streams; 0: none (default 4)")
    p.add_argument("--slots", type=int, default=16, help="slots per server process (default 16)")
    p.add_argument("--queue-size", type=int, default=64, help="queue per server process (default 64)")
    p.add_argument("--close-at-done", action="store_true",
                   help="streaming clients close the connection at `data: [DONE]`, as the synchronous OpenAI Python "
                   "client does, instead of reading the response to its end")
    p.add_argument("--workdir", type=Path, help="keep logs, audit databases and configs here (default: a temporary "
                   "directory, removed at the end)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ternlm-prod-")))
        workdir.mkdir(parents=True, exist_ok=True)
        setup = Setup(model=args.model, clients=args.clients, seconds=args.seconds, limit_seconds=args.limit_seconds,
                      rpm=args.rpm, tpm=args.tpm, max_tokens=args.max_tokens, stream_every=args.stream_every,
                      slots=args.slots, queue_size=args.queue_size, close_at_done=args.close_at_done,
                      workdir=workdir)
        print(f"ternlm production load test, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"machine: {machine()}")
        print(f"setup: 2 x `ternlm serve {setup.model or 'default'} --threads 1 --slots {setup.slots}` "
              f"(audit with content, response cache off, limits in Redis) behind nginx (deploy/nginx/ternlm.conf); "
              f"{setup.clients} clients, max_tokens {setup.max_tokens}, "
              + (f"every {setup.stream_every}th request streamed" if setup.stream_every else "no streaming")
              + (", streams closed at [DONE]" if setup.close_at_done else ""))
        ok = summary(report(setup, run(setup)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
