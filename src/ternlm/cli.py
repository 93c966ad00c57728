"""The `ternlm` command: run, chat, info and serve. Every flag also reads an environment variable
TERNLM_<FLAG>; `serve` also reads a TOML file (--config), with flags > environment > file > defaults."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from ternlm import __version__, load
from ternlm.api import HEAD_TYPES, WEIGHT_LAYOUTS
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
                   help="model directory (env TERNLM_MODEL; default: the small model shipped with ternlm)")
    p.add_argument("-t", "--threads", type=int, default=_env("threads", f.get("threads"), int),
                   help="kernel threads (env TERNLM_THREADS; default: physical cores)")
    p.add_argument("-c", "--ctx", type=int, default=_env("ctx", f.get("ctx"), int),
                   help="context length in tokens (env TERNLM_CTX; default: the model's maximum)")
    p.add_argument("--head", choices=HEAD_TYPES, default=_env("head", f.get("head", "q8_0")),
                   help="output head precision: q8_0, q4_0, or float as stored (env TERNLM_HEAD; default q8_0)")
    p.add_argument("--weights", choices=WEIGHT_LAYOUTS, default=_env("weights", f.get("weights", "i2")),
                   help="ternary weight layout: i2 (2 bits/weight) or tq1 (1.6 bits/weight, converted at load) "
                        "(env TERNLM_WEIGHTS; default i2)")


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


def cmd_run(args: argparse.Namespace) -> int:
    model = load(args.model, threads=args.threads, n_ctx=args.ctx, head=args.head, weights=args.weights)
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
    model = load(args.model, threads=args.threads, n_ctx=args.ctx, head=args.head, weights=args.weights)
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
    model = load(args.model, threads=args.threads, n_ctx=args.ctx, head=args.head, weights=args.weights)
    for key, value in model.info().items():
        print(f"{key:16} {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ternlm.server import ServerConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(model_name=args.model_name, slots=args.slots, queue_size=args.queue_size,
                          prefill_chunk=args.prefill_chunk, max_body_bytes=args.max_body_bytes,
                          keep_alive=args.keep_alive)
    app = create_app(lambda: load(args.model, threads=args.threads, n_ctx=args.ctx, head=args.head,
                                  weights=args.weights), config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


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
]


def _add_serve_args(p: argparse.ArgumentParser, file_values: dict[str, object]) -> None:
    p.add_argument("--config", default=_env("config", None),
                   help="TOML file of serve settings, keys named like the flags (env TERNLM_CONFIG; default none)")
    for flag, kind, default, text in SERVE_OPTIONS:
        p.add_argument(f"--{flag}", type=kind, default=_env(flag, file_values.get(flag, default), kind),
                       help=f"{text} (env TERNLM_{flag.upper().replace('-', '_')}; default %(default)s)")


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
