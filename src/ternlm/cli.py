"""The `ternlm` command: run, chat, info and serve a model; convert, verify, pull, list, rm, export and import
model files; keys and audit for the server; train, eval, bench and tco. Model and serve flags also read an
environment variable TERNLM_<FLAG>; `serve` also reads a TOML file (--config), with flags > environment > file >
defaults."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from ternlm import __version__, bench, evaluate, hub, load, tco, train
from ternlm.api import HEAD_TYPES, WEIGHT_LAYOUTS, Model
from ternlm.errors import TernlmError
from ternlm.generate import GenerationEvent


def _env(flag: str, default: object, kind: Callable = str) -> object:
    value = os.environ.get("TERNLM_" + flag.upper().replace("-", "_"))
    return default if value is None else kind(value)


# Model settings a serve config file may also hold, with their types.
MODEL_OPTIONS: dict[str, Callable] = {"model": str, "threads": int, "ctx": int, "head": str, "weights": str}


def _add_model_args(p: argparse.ArgumentParser, file_values: dict[str, object] | None = None) -> None:
    f = file_values or {}
    p.add_argument("model", nargs="?", default=_env("model", f.get("model")),
                   help="model directory or file, or a hub repo id (org/name[@revision]) already pulled "
                        "(env TERNLM_MODEL; default: the small model shipped with ternlm)")
    p.add_argument("-t", "--threads", type=int, default=_env("threads", f.get("threads"), int),
                   help="kernel threads (env TERNLM_THREADS; default: physical cores)")
    p.add_argument("-c", "--ctx", type=int, default=_env("ctx", f.get("ctx"), int),
                   help="context length in tokens (env TERNLM_CTX; default: the model's maximum)")
    p.add_argument("--head", choices=HEAD_TYPES, default=_env("head", f.get("head", "q8_0")),
                   help="output head precision: q8_0, q4_0, or float as stored (env TERNLM_HEAD; default q8_0)")
    p.add_argument("--weights", choices=WEIGHT_LAYOUTS, default=_env("weights", f.get("weights", "i2")),
                   help="ternary weight layout: i2 (2 bits/weight) or tq1 (1.6 bits/weight, converted at load) "
                        "(env TERNLM_WEIGHTS; default i2)")
    p.add_argument("--no-cache", action="store_true", default=_env("no_cache", False, _flag),
                   help="do not read or write the converted-model cache ($TERNLM_HOME/cache) for HF directories "
                        "and GGUF files (env TERNLM_NO_CACHE)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=_env("max_tokens", max_tokens, int),
                   help=f"tokens to generate (env TERNLM_MAX_TOKENS; default {max_tokens})")
    p.add_argument("--temperature", type=float, default=_env("temperature", 0.8, float),
                   help="sampling temperature, 0 = greedy (env TERNLM_TEMPERATURE; default 0.8)")
    p.add_argument("--top-k", type=int, default=_env("top_k", 40, int),
                   help="keep the k most likely tokens, 0 = off (env TERNLM_TOP_K; default 40)")
    p.add_argument("--top-p", type=float, default=_env("top_p", 0.95, float),
                   help="nucleus sampling mass (env TERNLM_TOP_P; default 0.95)")
    p.add_argument("--min-p", type=float, default=_env("min_p", 0.05, float),
                   help="drop tokens below min_p x the top probability (env TERNLM_MIN_P; default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=_env("repeat_penalty", 1.0, float),
                   help="repetition penalty, 1 = off (env TERNLM_REPEAT_PENALTY; default 1.0)")
    p.add_argument("--seed", type=int, default=_env("seed", None, int),
                   help="random seed for reproducible sampling (env TERNLM_SEED; default random)")


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repeat_penalty, "seed": args.seed}


def _stream(events: Iterator[GenerationEvent]) -> tuple[GenerationEvent | None, float, int]:
    """Print events as they come; return the last event, seconds to the first one, and events seen."""
    out = sys.stdout
    start = time.perf_counter()
    first_at, last, count = 0.0, None, 0
    for ev in events:
        if count == 0:
            first_at = time.perf_counter() - start
        count += 1
        last = ev
        out.write(ev.text)
        out.flush()
    return last, first_at, count


def _load(args: argparse.Namespace) -> Model:
    """The model of a command's MODEL argument: a path, or a hub repo id already in the local cache."""
    return load(hub.resolve(args.model), threads=args.threads, n_ctx=args.ctx, head=args.head, weights=args.weights,
                cache=not args.no_cache)


def cmd_run(args: argparse.Namespace) -> int:
    model = _load(args)
    if args.chat:
        prompt: str | list[int] = model.chat_tokens([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    start = time.perf_counter()
    last, first_at, count = _stream(model.generate(prompt, args.max_tokens, ignore_eos=args.ignore_eos,
                                                   **_sampling(args)))
    total = time.perf_counter() - start
    prompt_tokens = last.prompt_tokens if last else 0
    gen_rate = (count - 1) / (total - first_at) if count > 1 and total > first_at else 0.0
    print(file=sys.stdout, flush=True)
    print(f"[load {model.load_seconds:.2f} s | prompt {prompt_tokens} tok, "
          f"{prompt_tokens / first_at if first_at else 0:.1f} tok/s | generated {count} tok, {gen_rate:.1f} tok/s"
          f" | threads {model.info()['threads']} | {last.finish_reason if last else '-'}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"ternlm chat with {model.path.name} — /reset clears the conversation, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = []
            for ev in model.chat(messages, args.max_tokens, **_sampling(args)):
                reply.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        except TernlmError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args)
    for key, value in model.info().items():
        print(f"{key:16} {value}")
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ternlm.access import LOOPBACK_HOSTS, AccessConfig
    from ternlm.server import ServerConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security = AccessConfig(
        keys_db=_path(args.keys_db) or AccessConfig().keys_db, require_auth=args.require_auth,
        redis_url=args.redis_url, default_rpm=args.default_rpm, default_tpm=args.default_tpm,
        audit_db=_path(args.audit_db), audit_content=args.audit_content,
        audit_secret_file=_path(args.audit_secret_file), audit_key_file=_path(args.audit_key_file),
        pii_filter=args.pii_filter, pii_detectors=_path(args.pii_detectors), response_cache=args.response_cache,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()))
    config = ServerConfig(model_name=args.model_name, slots=args.slots, queue_size=args.queue_size,
                          prefill_chunk=args.prefill_chunk, max_body_bytes=args.max_body_bytes,
                          keep_alive=args.keep_alive, access=security)
    app = create_app(lambda: _load(args), config)
    guard = app.state.guard
    if args.host not in LOOPBACK_HOSTS and not guard.auth_on() and not args.insecure:
        raise TernlmError(f"refusing to serve {args.host} without authentication: create a key "
                          "(`ternlm keys create --name NAME --role user`) or pass --require-auth; "
                          "--insecure serves the network with no key")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise TernlmError("TLS needs both --ssl-certfile and --ssl-keyfile")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                limit_concurrency=args.max_connections, timeout_keep_alive=args.idle_timeout,
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, proxy_headers=False)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ternlm.formats import native

    src, out = hub.resolve(args.src), Path(args.output)
    to = args.to or ("gguf" if out.suffix.lower() == ".gguf" else "tlm")
    start = time.perf_counter()
    if to == "gguf":
        from ternlm.formats.gguf_write import write_gguf

        loaded = native.prepare(native.open_model(src), "float", "i2")
        write_gguf(loaded, out, ternary_type=args.type, head_type=args.gguf_head)
    else:
        native.convert_native(src, out, head=args.head, weights=args.weights)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {to}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ternlm.formats.native import verify_native

    problems = verify_native(args.file)
    for p in problems:
        print(p)
    if not problems:
        print(f"{args.file}: every tensor matches its checksum")
    return 1 if problems else 0


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        path = hub.pull(args.repo, args.revision, allow_patterns=args.include, progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted: files already downloaded are kept; run pull again to continue", file=sys.stderr)
        return 130
    print(hub.model_path(path))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    models = hub.list_models()
    print(f"models in {hub.cache_dir()}:", file=sys.stderr)
    for m in models:
        print(f"{m.repo_id:48} {m.revision:12} {m.size_bytes / 1e9:7.2f} GB  {m.path}")
    if not models:
        print("(none; `ternlm pull ORG/NAME` downloads one)", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    freed = hub.remove(args.repo)
    print(f"removed {args.repo}: {freed / 1e9:.2f} GB freed", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = hub.export_model(args.model, args.out)
    print(f"{out}\n{out}.sha256", file=sys.stdout)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    print(hub.import_model(args.archive, args.dest))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from ternlm.keys import KeyStore
    from ternlm.paths import home

    store = KeyStore(_path(args.keys_db) or home() / "keys.db")
    try:
        if args.action == "create":
            key, record = store.create(args.name, args.role, rpm=args.rpm, tpm=args.tpm, max_tokens=args.max_tokens,
                                       max_prompt_tokens=args.max_prompt_tokens)
            print(key)
            print(f"created key '{record.name}' (role {record.role}, id {record.id}); it is shown only this once",
                  file=sys.stderr)
        elif args.action == "list":
            records = store.list(include_revoked=args.all)
            if args.json:
                print(json.dumps([r.public() for r in records], indent=2))
            for r in [] if args.json else records:
                limits = " ".join(f"{k}={getattr(r, k)}" for k in ("rpm", "tpm", "max_tokens", "max_prompt_tokens")
                                  if getattr(r, k) is not None)
                print(f"{r.name:20} {r.role:8} {r.id}  {time.strftime('%Y-%m-%d', time.gmtime(r.created))}"
                      f"{'  revoked' if r.revoked else ''}  {limits}".rstrip())
        else:
            record = store.revoke(args.name)
            print(f"revoked key '{record.name}' ({record.id})", file=sys.stderr)
    finally:
        store.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from ternlm.audit import open_log

    db = Path(args.audit_db).expanduser()
    if not db.exists():
        raise TernlmError(f"no audit log at {db}")
    log = open_log(db, _path(args.audit_secret_file), _path(args.audit_key_file))
    try:
        if args.action == "verify":
            result = log.verify()
            print(result.reason)
            return 0 if result.ok else 2
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                count = log.export(out, decrypt=not args.raw)
        else:
            count = log.export(sys.stdout, decrypt=not args.raw)
        print(f"exported {count} records", file=sys.stderr)
        return 0
    finally:
        log.close()


# `ternlm serve` settings: (flag, type, default, help). Each is also TERNLM_<FLAG> and a key of the TOML file.
SERVE_OPTIONS: list[tuple[str, Callable, object, str]] = [
    ("host", str, "127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network"),
    ("port", int, 8080, "TCP port"),
    ("model-name", str, None, "model id clients send as \"model\"; None means the model directory's name"),
    ("slots", int, 8, "requests decoded together; each holds a KV cache of --ctx positions"),
    ("queue-size", int, 64, "requests that may wait for a free slot; beyond that the server answers 503"),
    ("prefill-chunk", int, 256, "prompt tokens prefilled per step between decode steps of running requests"),
    ("max-body-bytes", int, 4 << 20, "largest request body accepted; larger ones get 413"),
    ("keep-alive", float, 5.0, "seconds between SSE keep-alive comments while a stream waits"),
    ("log-level", str, "info", "debug, info, warning or error"),
    ("max-connections", int, 256, "concurrent connections; beyond that new ones get 503"),
    ("idle-timeout", float, 5.0, "seconds an idle keep-alive connection stays open; a proxy in front must close "
                                 "its idle upstream connections sooner"),
    ("ssl-certfile", str, None, "TLS certificate (PEM); with --ssl-keyfile the server speaks HTTPS"),
    ("ssl-keyfile", str, None, "TLS private key (PEM)"),
    ("cors-origins", str, "", "comma-separated origins allowed to call the API from a browser; empty: none"),
    ("keys-db", str, None, "API-key database; None means $TERNLM_HOME/keys.db (TERNLM_HOME defaults to ~/.ternlm)"),
    ("require-auth", bool, False, "require an API key even while no key exists (auth is on once one does)"),
    ("insecure", bool, False, "allow binding a non-loopback address with auth off"),
    ("default-rpm", int, None, "requests per minute for keys without their own limit, and per address without auth"),
    ("default-tpm", int, None, "tokens (prompt + max_tokens) per minute, likewise"),
    ("redis-url", str, None, "Redis shared by several server processes for rate limits and the response cache"),
    ("response-cache", int, 1024, "answers kept for identical deterministic requests (temperature 0 or seed); 0: off"),
    ("audit-db", str, None, "tamper-evident audit log (SQLite); None: no audit log"),
    ("audit-content", bool, False, "also record prompt and completion text in the audit log"),
    ("audit-secret-file", str, None, "HMAC secret of the audit chain (or TERNLM_AUDIT_SECRET); None: AUDIT_DB.secret"),
    ("audit-key-file", str, None, "AES-256-GCM key encrypting recorded content (or TERNLM_AUDIT_KEY); None: plain"),
    ("pii-filter", str, "off", "mask personal data: off, output (answers) or both (answers and prompts)"),
    ("pii-detectors", str, None, "TOML file of PII detectors added to (or replacing, by name) the shipped ones"),
]


def _add_serve_args(p: argparse.ArgumentParser, file_values: dict[str, object]) -> None:
    p.add_argument("--config", default=_env("config", None),
                   help="TOML file of serve settings, keys named like the flags (env TERNLM_CONFIG; default none)")
    for flag, kind, default, text in SERVE_OPTIONS:
        env = f"env TERNLM_{flag.upper().replace('-', '_')}"
        if kind is bool:
            p.add_argument(f"--{flag}", action="store_true", default=_env(flag, file_values.get(flag, default), _flag),
                           help=f"{text} ({env}; default off)")
        else:
            p.add_argument(f"--{flag}", type=kind, default=_env(flag, file_values.get(flag, default), kind),
                           help=f"{text} ({env}; default %(default)s)")


def _read_config(argv: list[str] | None) -> dict[str, object]:
    """The settings of the TOML file named by --config or TERNLM_CONFIG, checked against the serve flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=os.environ.get("TERNLM_CONFIG"))
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TernlmError(f"config file {path}: {e}") from e
    kinds = {flag: kind for flag, kind, _, _ in SERVE_OPTIONS} | MODEL_OPTIONS
    values = {}
    for key, value in table.items():
        flag = key.replace("_", "-")
        if flag not in kinds:
            raise TernlmError(f"config file {path}: unknown setting {key!r}; known: {', '.join(sorted(kinds))}")
        try:
            values[flag] = kinds[flag](value)
        except (TypeError, ValueError) as e:
            raise TernlmError(f"config file {path}: {key} = {value!r}: {e}") from e
    return values


def build_parser(file_values: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The parser; `file_values` (from a serve --config file) replace the built-in defaults."""
    file_values = file_values or {}
    parser = argparse.ArgumentParser(prog="ternlm", description="Run ternary (1.58-bit) language models on CPUs.")
    parser.add_argument("--version", action="version", version=f"ternlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text from a prompt")
    _add_model_args(run)
    run.add_argument("-p", "--prompt", default=_env("prompt", "Once upon a time"),
                     help="prompt text (env TERNLM_PROMPT; default 'Once upon a time')")
    run.add_argument("--chat", action="store_true", default=_env("chat", False, _flag),
                     help="wrap the prompt in the model's chat template as a user turn (env TERNLM_CHAT)")
    run.add_argument("--ignore-eos", action="store_true", default=_env("ignore_eos", False, _flag),
                     help="keep generating past end-of-sequence tokens, for benchmarks (env TERNLM_IGNORE_EOS)")
    _add_sampling_args(run, 128)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    _add_model_args(chat)
    chat.add_argument("--system", default=_env("system", None),
                      help="system prompt (env TERNLM_SYSTEM; default none)")
    _add_sampling_args(chat, 512)
    chat.set_defaults(func=cmd_chat)

    info = sub.add_parser("info", help="print architecture, sizes and formats of a model")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)

    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_args(serve, file_values)
    _add_serve_args(serve, file_values)
    serve.set_defaults(func=cmd_serve)

    convert_p = sub.add_parser("convert", help="convert a model to ternlm's .tlm file or to a llama.cpp GGUF")
    convert_p.add_argument("src", help="model directory or file (HF directory, GGUF, .tlm) or a cached repo id")
    convert_p.add_argument("-o", "--output", required=True, help="the file to write")
    convert_p.add_argument("--to", choices=("tlm", "gguf"), default=None,
                           help="output format (default: gguf for a .gguf name, else tlm)")
    convert_p.add_argument("--type", choices=("TQ2_0", "TQ1_0", "I2_S"), default="TQ2_0",
                           help="GGUF type of the ternary projections (default TQ2_0; I2_S: a file for bitnet.cpp)")
    convert_p.add_argument("--gguf-head", choices=("F16", "F32", "Q8_0", "Q6_K", "Q4_0"), default="F16",
                           help="GGUF type of the embedding and output head (default F16)")
    convert_p.add_argument("--head", choices=HEAD_TYPES, default="q8_0",
                           help="head precision stored in a .tlm file (default q8_0)")
    convert_p.add_argument("--weights", choices=WEIGHT_LAYOUTS, default="i2",
                           help="ternary layout stored in a .tlm file (default i2)")
    convert_p.set_defaults(func=cmd_convert)
    verify_p = sub.add_parser("verify", help="check every tensor of a .tlm file against its checksum")
    verify_p.add_argument("file")
    verify_p.set_defaults(func=cmd_verify)

    pull_p = sub.add_parser("pull", help="download a model from the Hugging Face hub into its local cache")
    pull_p.add_argument("repo", help="org/name[@revision], e.g. microsoft/bitnet-b1.58-2B-4T; known repos: "
                                     + ", ".join(hub.KNOWN_REPOS))
    pull_p.add_argument("--revision", default=None, help="branch, tag or commit (overrides @revision)")
    pull_p.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                        help="file patterns to download instead of the model files ternlm reads")
    pull_p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pull_p.set_defaults(func=cmd_pull)
    list_p = sub.add_parser("list", help="list the models in the local Hugging Face cache")
    list_p.set_defaults(func=cmd_list)
    rm_p = sub.add_parser("rm", help="delete a model (org/name, or org/name@revision) from the local cache")
    rm_p.add_argument("repo")
    rm_p.set_defaults(func=cmd_rm)
    export_p = sub.add_parser("export", help="write a model into one file (tar + sha256) for air-gapped transfer")
    export_p.add_argument("model", help="model directory or file, or a cached repo id")
    export_p.add_argument("out", help="the archive to write (a directory gets NAME.tar)")
    export_p.set_defaults(func=cmd_export)
    import_p = sub.add_parser("import", help="check an exported archive against its checksums and unpack it")
    import_p.add_argument("archive")
    import_p.add_argument("dest", nargs="?", default=None, help="where to unpack (default $TERNLM_HOME/models/NAME)")
    import_p.set_defaults(func=cmd_import)

    eval_p = sub.add_parser("eval", help="perplexity of a text, accuracy on a multiple-choice task (JSON lines)")
    evaluate.add_arguments(eval_p)
    eval_p.set_defaults(func=evaluate.run)
    train_p = sub.add_parser("train", help="train a ternary (BitNet b1.58) model from text files, or fine-tune one "
                                           "(needs the train extra: PyTorch)")
    train.add_arguments(train_p)
    train_p.set_defaults(func=train.run)
    bench_p = sub.add_parser("bench", help="prefill/decode speed, memory and energy against a float baseline, "
                                            "on a model or on dummy models of the published BitNet sizes")
    bench.add_arguments(bench_p)
    bench_p.set_defaults(func=bench.main)
    tco_p = sub.add_parser("tco", help="total cost of ownership: on-premise ternlm against cloud API prices")
    tco.add_arguments(tco_p)
    tco_p.set_defaults(func=tco.run)

    keys = sub.add_parser("keys", help="create, list and revoke API keys of the server")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="make a key and print it (only this once)")
    create.add_argument("--name", required=True, help="a name for the key, unique among active keys")
    create.add_argument("--role", choices=("admin", "user", "metrics"), default="user",
                        help="user: the model API; metrics: only /metrics; admin: everything (default user)")
    for flag, text in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                       ("max-tokens", "largest max_tokens a request may ask"),
                       ("max-prompt-tokens", "longest prompt in tokens")):
        create.add_argument(f"--{flag}", type=int, default=None, help=f"{text} (default: the server's default)")
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by name or id")
    revoke.add_argument("name")
    for p in (create, listing, revoke):
        p.add_argument("--keys-db", default=_env("keys_db", None),
                       help="key database (env TERNLM_KEYS_DB; default $TERNLM_HOME/keys.db, ~/.ternlm/keys.db)")
    keys.set_defaults(func=cmd_keys)

    audit = sub.add_parser("audit", help="verify or export the server's audit log")
    audit_sub = audit.add_subparsers(dest="action", required=True)
    verify = audit_sub.add_parser("verify", help="prove the hash chain intact or name the first bad record")
    export = audit_sub.add_parser("export", help="write the records as JSON lines")
    export.add_argument("-o", "--output", default=None, help="file to write (default stdout)")
    export.add_argument("--raw", action="store_true", help="leave encrypted content encrypted")
    for p in (verify, export):
        p.add_argument("--audit-db", required=_env("audit_db", None) is None, default=_env("audit_db", None),
                       help="the audit database (env TERNLM_AUDIT_DB)")
        p.add_argument("--audit-secret-file", default=_env("audit_secret_file", None),
                       help="HMAC secret (or TERNLM_AUDIT_SECRET; default AUDIT_DB.secret)")
        p.add_argument("--audit-key-file", default=_env("audit_key_file", None),
                       help="content key (or TERNLM_AUDIT_KEY), to decrypt recorded content")
    audit.set_defaults(func=cmd_audit)
    return parser


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(_read_config(argv)).parse_args(argv)
        return args.func(args)
    except TernlmError as e:
        print(f"ternlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
