"""deploy/: the scale-out examples (nginx, HAProxy, systemd, Docker, Kubernetes) are valid for their tools and
only use routes, flags and settings that `ternlm serve` has, so a renamed flag breaks this test, not a deployment."""

from __future__ import annotations

import argparse
import configparser
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ternlm.access import AccessConfig
from ternlm.cli import build_parser
from ternlm.server import ServerConfig, create_app

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX = DEPLOY / "nginx" / "ternlm.conf"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
UNIT = DEPLOY / "systemd" / "ternlm@.service"
TOML = DEPLOY / "systemd" / "ternlm.toml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s" / "ternlm.yaml"
README = DEPLOY / "README.md"
BACKEND_PORTS = (8081, 8082)

# TERNLM_* variables that are not serve flags: the state directory, secrets read from the environment, the model.
OTHER_ENV = {"TERNLM_HOME", "TERNLM_AUDIT_SECRET", "TERNLM_AUDIT_KEY", "TERNLM_MODEL"}
SUBCOMMAND = re.compile(r"\bternlm\s+(serve|keys|audit|run|chat|info)\b(.*)")
ENV_NAME = re.compile(r"\bTERNLM_[A-Z_]+\b")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[name]


def _options(words: list[str]) -> set[str]:
    """The option strings of `ternlm WORDS...`, following nested subcommands (`keys create`, `audit verify`)."""
    parser = build_parser()
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return {o for a in parser._actions for o in a.option_strings}


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _check_command(argv: list[str], where: str) -> None:
    """`argv` is a ternlm command line without the program name; every --flag must belong to its subcommand."""
    unknown = [f for f in _flags(argv) if f not in _options(argv)]
    assert not unknown, f"{where}: `ternlm {' '.join(argv)}` uses flags ternlm does not have: {unknown}"


def _commands_in_text(text: str) -> list[list[str]]:
    """Each `ternlm SUBCOMMAND ...` on a (backslash-joined) line, cut at shell operators and comments."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        for m in SUBCOMMAND.finditer(line):
            rest = re.split(r"\s(?:\||&&|;|>|#)|[`\"']", m.group(2))[0]
            commands.append([m.group(1), *shlex.split(rest)])
    return commands


def _serve_key(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_toml(table: dict[str, object], where: str) -> None:
    known = _options(["serve"])
    unknown = [k for k in table if k != "model" and _serve_key(k) not in known]
    assert not unknown, f"{where}: settings that `ternlm serve` does not have: {unknown}"


def _check_env(names: set[str], where: str) -> None:
    known = _options(["serve"])
    unknown = [n for n in names if n not in OTHER_ENV and _serve_key(n.removeprefix("TERNLM_").lower()) not in known]
    assert not unknown, f"{where}: environment variables that ternlm does not read: {unknown}"


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The paths the server answers; building the app loads no model (that happens once it runs)."""
    keys_db = tmp_path_factory.mktemp("keys") / "keys.db"
    app = create_app(lambda: None, ServerConfig(access=AccessConfig(keys_db=keys_db)))
    app.state.guard.close()
    return {getattr(r, "path", "") for r in app.routes}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seconds(value: str) -> float:
    """An nginx/HAProxy duration ('600s', '10m', '5000') in seconds; a bare number is milliseconds in HAProxy."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert m, f"not a duration: {value}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[m.group(2)]


# -- nginx -------------------------------------------------------------------------------------------------------


def test_nginx_balances_two_processes_and_keeps_streams_unbuffered() -> None:
    text = NGINX.read_text(encoding="utf-8")
    upstream = re.search(r"upstream ternlm \{(.*?)\}", text, re.S).group(1)
    assert "least_conn;" in upstream
    for port in BACKEND_PORTS:
        assert re.search(rf"server 127\.0\.0\.1:{port} max_fails=\d+ fail_timeout=\d+s;", upstream)
    servers = text.split("\nserver {")[1:]
    assert len(servers) == 2, "a plain HTTP server block and a TLS one"
    body_limit = build_parser().parse_args(["serve"]).max_body_bytes
    for block in servers:
        assert "proxy_pass http://ternlm;" in block
        assert "proxy_buffering off;" in block
        assert "proxy_http_version 1.1;" in block
        assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in block
        assert re.search(r"proxy_next_upstream error timeout http_503\b", block)
        assert _seconds(re.search(r"proxy_read_timeout (\S+);", block).group(1)) >= 300
        size = re.search(r"client_max_body_size (\d+)m;", block).group(1)
        assert int(size) << 20 == body_limit, "nginx should refuse exactly what ternlm would refuse"
    assert "ssl_certificate " in servers[1] and "ssl_certificate_key " in servers[1]


def test_nginx_logs_no_bodies_and_disables_nothing_in_comments() -> None:
    text = NGINX.read_text(encoding="utf-8")
    for variable in ("$request_body", "$http_authorization", "$http_x_api_key", "$request ", "$args"):
        assert variable not in text
    commented_out = [line for line in text.splitlines() if re.match(r"\s*#\s*[a-z_]+ [^ ].*;\s*$", line)]
    assert not commented_out, f"comments should explain, not hold switched-off directives: {commented_out}"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx, openssl = shutil.which("nginx") or "/usr/sbin/nginx", shutil.which("openssl")
    if not Path(nginx).exists() or openssl is None:
        pytest.skip("needs nginx and openssl (apt-get install nginx openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    text = NGINX.read_text(encoding="utf-8")
    text = text.replace("/etc/ternlm/tls/fullchain.pem", str(cert)).replace("/etc/ternlm/tls/privkey.pem", str(key))
    text = text.replace("/var/log/nginx/", f"{tmp_path}/")
    # nginx -t binds the listen addresses: use free local ports (and no IPv6, which a CI box may lack).
    text = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", text)
    text = re.sub(r"listen \d+", lambda _: f"listen 127.0.0.1:{_free_port()}", text)
    (tmp_path / "ternlm.conf").write_text(text, encoding="utf-8")
    temp_paths = "\n".join(f"    {kind}_temp_path {tmp_path}/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n{temp_paths}\n    access_log off;\n    include {tmp_path}/ternlm.conf;\n}}\n", encoding="utf-8")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# -- HAProxy -----------------------------------------------------------------------------------------------------


def test_haproxy_checks_readiness_and_allows_long_streams() -> None:
    text = HAPROXY.read_text(encoding="utf-8")
    assert "option httpchk GET /ready" in text
    assert "balance leastconn" in text
    for port in BACKEND_PORTS:
        assert re.search(rf"server \S+ 127\.0\.0\.1:{port}\b", text)
    for side in ("client", "server"):
        assert _seconds(re.search(rf"timeout {side} (\S+)", text).group(1)) >= 300
    body_limit = build_parser().parse_args(["serve"]).max_body_bytes
    assert f"req.hdr_val(content-length) gt {body_limit}" in text


def test_haproxy_accepts_the_config() -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.skip("needs haproxy (apt-get install haproxy)")
    result = subprocess.run([haproxy, "-c", "-f", str(HAPROXY)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd -----------------------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    return unit


def test_systemd_unit_runs_one_hardened_process_per_port() -> None:
    unit = _unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"].replace("\\\n", " "))
    assert argv[1:6] == ["serve", "--config", "/etc/ternlm/ternlm.toml", "--port", "%i"]
    _check_command(argv[1:], str(UNIT))
    assert service["User"] and service["User"] != "root"
    assert service["Restart"] == "on-failure"
    for directive in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert service[directive] == "yes", directive
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/ternlm" in service["ReadWritePaths"].split()
    assert "Environment=TERNLM_HOME=/var/lib/ternlm" in UNIT.read_text(encoding="utf-8")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze")
    probe = tmp_path / "probe" / "probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nExecStart=/bin/true\n", encoding="utf-8")
    if subprocess.run([analyze, "verify", "--man=no", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("systemd-analyze verify does not work here (no systemd in this container?)")
    # verify insists that the program exists; the unit's own path is where the install puts it.
    text = UNIT.read_text(encoding="utf-8").replace("/opt/ternlm/bin/ternlm", sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "ternlm@" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_serve_config_file_holds_only_serve_settings() -> None:
    table = tomllib.loads(TOML.read_text(encoding="utf-8"))
    _check_toml(table, str(TOML))
    assert table["host"] == "127.0.0.1", "the processes sit behind the proxy, on loopback"
    assert "port" not in table, "the port is the unit's instance name"


# -- Docker ------------------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines[stages[-1]:]]


def test_dockerfile_runs_as_a_user_with_auth_on(routes: set[str]) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert all(line.split()[1].startswith("python:3.11-slim") for line in text.splitlines() if line.startswith("FROM "))
    final = dict(_dockerfile())
    assert final["USER"] not in ("root", "0")
    cmd = json.loads(final["CMD"])
    assert cmd[:2] == ["ternlm", "serve"]
    _check_command(cmd[1:], str(DOCKERFILE))
    assert "--require-auth" in cmd, "binding 0.0.0.0 needs auth on"
    port = cmd[cmd.index("--port") + 1]
    assert final["EXPOSE"] == port
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w*)", final["HEALTHCHECK"])
    assert health.group(1) == port and health.group(2) == "/health" and "/health" in routes


# -- Kubernetes --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(K8S.read_text(encoding="utf-8")) if d}


def test_k8s_probes_resources_and_autoscaler(k8s: dict[tuple[str, str], dict], routes: set[str]) -> None:
    deployment = k8s[("Deployment", "ternlm")]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"/ready", "/health"} <= routes
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    service = k8s[("Service", "ternlm")]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    hpa = k8s[("HorizontalPodAutoscaler", "ternlm")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ternlm"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["minReplicas"] >= 2


def test_k8s_server_uses_known_flags_settings_and_secrets(k8s: dict[tuple[str, str], dict]) -> None:
    pod = k8s[("Deployment", "ternlm")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"] + container["args"]
    assert argv[:2] == ["ternlm", "serve"]
    _check_command(argv[1:], str(K8S))
    _check_env({e["name"] for e in container["env"] if e["name"].startswith("TERNLM_")}, str(K8S))
    table = tomllib.loads(k8s[("ConfigMap", "ternlm-config")]["data"]["ternlm.toml"])
    _check_toml(table, f"{K8S} ConfigMap")
    assert table["threads"] == int(container["resources"]["requests"]["cpu"]), "one kernel thread per core"
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"ternlm-secrets"}
    keys = {item["key"] for v in pod["volumes"] if "secret" in v for item in v["secret"]["items"]}
    assert {"keys.db", "audit-secret"} <= keys
    redis = k8s[("Service", "ternlm-redis")]["spec"]["ports"][0]["port"]
    redis_url = next(e["value"] for e in container["env"] if e["name"] == "TERNLM_REDIS_URL")
    assert redis_url.endswith(f"@ternlm-redis:{redis}/0")


# -- every file: commands and environment -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [README, UNIT, DOCKERFILE, K8S, NGINX, HAPROXY], ids=lambda p: p.name)
def test_commands_and_variables_in_deploy_files_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for argv in _commands_in_text(text):
        _check_command(argv, path.name)
    _check_env(set(ENV_NAME.findall(text)), path.name)


def test_readme_covers_each_way_to_scale_out() -> None:
    text = README.read_text(encoding="utf-8")
    for name in ("ternlm@.service", "ternlm.toml", "nginx/ternlm.conf", "haproxy/haproxy.cfg", "Dockerfile",
                 "k8s/ternlm.yaml", "--redis-url", "ternlm audit verify", "--ssl-certfile", "/ready"):
        assert name in text, name
