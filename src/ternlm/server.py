"""The OpenAI-compatible HTTP server: FastAPI routes in front of one Engine that owns the model.

HTTP work (JSON, chat templates, tokenization, SSE) runs on the event loop; the model runs on the engine
thread, and the two meet through each request's Stream. The model loads in the background after the port
opens, so /health answers at once and /ready turns 200 when requests can be served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ternlm import access, grammar, protocol
from ternlm.access import AccessConfig, Guard, Reservation
from ternlm.api import Model
from ternlm.cache import cache_key
from ternlm.engine import Engine, Stream
from ternlm.errors import ContextOverflowError, EngineError, OverloadedError, TernlmError
from ternlm.generate import GenerationEvent
from ternlm.metrics import Metrics
from ternlm.pii import StreamMasker
from ternlm.protocol import APIError, ChatRequest, CompletionRequest, error_body
from ternlm.sampling import SamplingParams

log = logging.getLogger("ternlm.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    """Server settings; `ternlm serve` fills these from flags, TERNLM_* variables and a TOML file."""

    model_name: str | None = None  # the id clients pass as "model"; default: the model directory's name
    slots: int = 8  # sequences decoded together
    queue_size: int = 64  # requests that may wait for a slot before new ones get 503
    prefill_chunk: int = 256  # prompt tokens per prefill step, between decode steps of running requests
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    keep_alive: float = 5.0  # seconds between SSE comments while a stream waits (e.g. a long prefill)
    access: AccessConfig = field(default_factory=AccessConfig)  # keys, limits, audit, PII, cache, CORS


@dataclass
class _State:
    model: Model | None = None
    engine: Engine | None = None
    load_error: str | None = None
    name: str = ""
    metrics: Metrics = field(default_factory=Metrics)


def create_app(model: Model | Callable[[], Model], config: ServerConfig | None = None) -> FastAPI:
    """The app serving `model` (or what the callable loads, in a background thread once the server is up)."""
    cfg = config or ServerConfig()
    state = _State()
    guard = Guard(cfg.access, state.metrics)

    def start(m: Model) -> None:
        state.name = cfg.model_name or m.path.name
        engine = Engine(m, slots=cfg.slots, queue_size=cfg.queue_size, prefill_chunk=cfg.prefill_chunk,
                        metrics=state.metrics)
        engine.start()
        state.model, state.engine = m, engine
        log.info("serving %s with %d slots", state.name, cfg.slots)

    def load_and_prepare() -> Model:
        m = model() if callable(model) and not isinstance(model, Model) else model
        if m.tokenizer is not None:  # the grammar library's view of the vocabulary: ~1 s for 128k ids, once
            try:
                grammar.prepare(m.tokenizer)
            except TernlmError as e:  # only JSON-constrained requests need it; they will get this as a 400
                log.warning("%s", e)
        return m

    async def load_in_background() -> None:
        try:
            start(await asyncio.to_thread(load_and_prepare))
        except Exception as e:  # reported by /health and /ready; the process stays up to say why
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(load_in_background())
        yield
        task.cancel()
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)
        guard.close()

    app = FastAPI(title="ternlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ternlm, app.state.guard = state, guard
    page = STATIC / "index.html"
    app.add_middleware(access.AccessMiddleware, guard=guard,
                       page_csp=access.page_csp(page.read_text(encoding="utf-8")) if page.exists() else None)
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)
    if cfg.access.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.access.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-Api-Key", "Content-Type"])
    _install_error_handlers(app)

    def ready() -> tuple[Model, Engine]:
        if state.engine is None:
            raise APIError(503, state.load_error or "the model is still loading", "server_error",
                           "model_not_ready", {"Retry-After": "5"})
        return state.model, state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != state.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.name}'",
                           code="model_not_found")

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {cfg.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    async def parse(request: Request, cls: type) -> tuple[Model, Engine, dict[str, Any], Any]:
        """The model, engine, raw body and validated request of a completion route."""
        model, engine = ready()
        body = await read_json(request)
        req = _parse(cls, body)
        check_model(req.model)
        return model, engine, body, req

    async def admit(request: Request, model: Model, ids: list[int], req: ChatRequest | CompletionRequest,
                    prompt_text: str | None) -> Reservation:
        """Fill the request's audit record and take its tokens from the caller's rate-limit budget."""
        rec = access.request_record(request)
        rec.model, rec.prompt_tokens, rec.prompt = state.name, len(ids), prompt_text
        if guard.pii is not None and (getattr(req, "logprobs", None) not in (None, False)):
            raise APIError(400, "logprobs are not available while the PII filter is on: token texts would bypass "
                                "the masking")
        return await guard.admit(access.principal(request), len(ids), req.token_limit,
                                 max(model.n_ctx - len(ids), 1), access.response_headers(request))

    def submit(engine: Engine, ids: list[int], req: ChatRequest | CompletionRequest, reservation: Reservation,
               logprobs: int | None, constraint: object | None) -> Stream:
        return engine.submit(ids, reservation.max_tokens, SamplingParams(**req.sampling()), stop=req.stop,
                             ignore_eos=req.ignore_eos, logprobs=logprobs, constraint=constraint,
                             loop=asyncio.get_running_loop())

    async def answer(request: Request, body: dict[str, Any], reservation: Reservation,
                     make: Callable[[], Any]) -> Response:
        """A non-streaming answer: from the response cache when an identical deterministic request was
        answered before, else from `make()` (which runs the model); the unused reserved tokens go back."""
        rec, used = access.request_record(request), reservation.tokens
        try:
            key = cache_key(request.url.path, state.name, body) if guard.cache is not None else None
            cached = await guard.cached(key)
            if cached is not None:
                usage = json.loads(cached).get("usage", {})
                used = usage.get("total_tokens", used)
                rec.completion_tokens, rec.extra["cached_response"] = usage.get("completion_tokens", 0), True
                return Response(cached, media_type="application/json", headers={"X-Ternlm-Cache": "hit"})
            result = await make()
            used = result["usage"]["total_tokens"]
            rec.completion_tokens = result["usage"]["completion_tokens"]
            raw = json.dumps(result, ensure_ascii=False).encode()
            await guard.remember(key, raw)
            return Response(raw, media_type="application/json")
        finally:
            await guard.release(reservation, used)

    def streamed(request: Request, chunks: AsyncIterator[dict[str, Any]], stream: Stream,
                 reservation: Reservation) -> StreamingResponse:
        rec = access.request_record(request)

        async def settled() -> AsyncIterator[dict[str, Any]]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await guard.release(reservation, rec.prompt_tokens + rec.completion_tokens)

        return _sse(settled(), stream, cfg.keep_alive)

    access.add_admin_routes(app, guard, read_json)

    @app.get("/health")
    async def health() -> JSONResponse:
        error = state.load_error or (state.engine.error if state.engine is not None else None)
        if error:
            return JSONResponse({"status": "error", "error": error}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready_route() -> JSONResponse:
        ready()
        return JSONResponse({"status": "ready", "model": state.name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index() -> Response:
        if not page.exists():
            return JSONResponse({"message": "ternlm server; the API is under /v1"})
        return FileResponse(page, media_type="text/html")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        model, _ = ready()
        return JSONResponse({"object": "list", "data": [_model_card(state.name, model)]})

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> JSONResponse:
        model, _ = ready()
        check_model(name)
        return JSONResponse(_model_card(state.name, model))

    @app.post("/tokenize", openapi_extra=_body({"type": "object", "properties": {
        "content": {"type": "string"}, "prompt": {"type": "string"}, "add_special": {"type": "boolean"},
        "messages": ChatRequest.model_json_schema()["properties"]["messages"]}}))
    async def tokenize(request: Request) -> JSONResponse:
        model, _ = ready()
        body = await read_json(request)
        tok = _tokenizer(model)
        if "messages" in body:
            ids = model.chat_tokens(body["messages"])
        else:
            text = body.get("content", body.get("prompt"))
            if not isinstance(text, str):
                raise APIError(400, "give the text to tokenize as a string 'content' (or 'prompt' or 'messages')")
            ids = tok.encode(text, add_bos=bool(body.get("add_special", True)))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": model.n_ctx})

    @app.post("/detokenize", openapi_extra=_body({"type": "object", "required": ["tokens"], "properties": {
        "tokens": {"type": "array", "items": {"type": "integer"}}}}))
    async def detokenize(request: Request) -> JSONResponse:
        model, _ = ready()
        ids = (await read_json(request)).get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError(400, "'tokens' must be a list of integers")
        model.check_ids(ids or [0])
        return JSONResponse({"content": _tokenizer(model).decode(ids)})

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatRequest.model_json_schema()))
    async def chat_completions(request: Request) -> Response:
        model, engine, body, req = await parse(request, ChatRequest)
        tools = _active_tools(req)
        messages = [_masked_message(m, guard.mask_input) for m in req.messages]
        if tools:
            messages.insert(0, {"role": "system", "content": _tools_prompt(tools)})
        ids = model.chat_tokens(messages)
        reservation = await admit(request, model, ids, req, json.dumps(messages, ensure_ascii=False))
        constraint = _chat_constraint(model, req, tools)
        rid, created = protocol.new_id("chatcmpl"), protocol.now()
        head = {"id": rid, "object": "chat.completion", "created": created, "model": state.name}
        tok = _tokenizer(model)
        rec = access.request_record(request)
        if req.stream:
            stream = submit(engine, ids, req, reservation, req.logprobs_k, constraint)
            return streamed(request, _chat_chunks(stream, head, req, tools, len(ids), tok, guard.output_masker(),
                                                  rec, guard.count_pii), stream, reservation)

        async def make() -> dict[str, Any]:
            events = await _collect(submit(engine, ids, req, reservation, req.logprobs_k, constraint), request)
            text = rec.completion = guard.mask_output("".join(e.text for e in events))
            finish = events[-1].finish_reason if events else "stop"
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = _tool_calls(text, tools)
            if calls:
                message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": finish,
                      "logprobs": protocol.chat_logprobs(events, tok.token_text) if req.logprobs else None}
            return {**head, "choices": [choice], "usage": protocol.usage(events[-1] if events else None, len(ids))}

        return await answer(request, body, reservation, make)

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest.model_json_schema()))
    async def completions(request: Request) -> Response:
        model, engine, body, req = await parse(request, CompletionRequest)
        prompt = guard.mask_input(req.prompt) if isinstance(req.prompt, str) else None
        ids = (_tokenizer(model).encode(prompt) if prompt is not None
               else [int(i) for i in model.check_ids(req.prompt)])
        reservation = await admit(request, model, ids, req, prompt)
        rid, created = protocol.new_id("cmpl"), protocol.now()
        head = {"id": rid, "object": "text_completion", "created": created, "model": state.name}
        tok = _TokenText(model.tokenizer)  # a model without a tokenizer still completes token ids
        echo = _tokenizer(model).decode(ids) if req.echo else ""
        rec = access.request_record(request)
        if req.stream:
            stream = submit(engine, ids, req, reservation, req.logprobs, None)
            return streamed(request, _completion_chunks(stream, head, req, len(ids), tok, echo,
                                                        guard.output_masker(), rec, guard.count_pii),
                            stream, reservation)

        async def make() -> dict[str, Any]:
            events = await _collect(submit(engine, ids, req, reservation, req.logprobs, None), request)
            rec.completion = guard.mask_output("".join(e.text for e in events))
            choice = {"index": 0, "text": echo + rec.completion,
                      "finish_reason": events[-1].finish_reason if events else "stop",
                      "logprobs": (protocol.completion_logprobs(events, tok.token_text, len(echo))
                                   if req.logprobs is not None else None)}
            return {**head, "choices": [choice], "usage": protocol.usage(events[-1] if events else None, len(ids))}

        return await answer(request, body, reservation, make)

    return app


class ServerURL(str):
    """The base URL of a server started by serve_subprocess; `.process` is its child process."""

    process: subprocess.Popen


@contextmanager
def serve_subprocess(args: Sequence[str] = (), timeout: float = 60.0, log: IO | None = None,
                     port: int | None = None) -> Iterator[ServerURL]:
    """Run `ternlm serve ARGS` in a child process on a loopback port (a free one unless given); yield its
    base URL once /ready answers 200, and stop it afterwards. Its output goes to `log` (default: this
    process's stdout/stderr). For tests, benchmarks and notebooks that want a real server."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ternlm", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log is not None else None)
    url = ServerURL(f"{'https' if '--ssl-certfile' in args else 'http'}://127.0.0.1:{port}")
    url.process = proc
    try:
        deadline = time.monotonic() + timeout
        while _get(url + "/ready")[0] != 200:
            if proc.poll() is not None:
                raise TernlmError(f"ternlm serve exited with {proc.returncode}; see its output")
            status, body = _get(url + "/health")
            if status == 500:  # the model failed to load; the process stays up to say why
                raise TernlmError(f"ternlm serve could not load the model: {body}")
            if time.monotonic() > deadline:
                raise TernlmError(f"ternlm serve did not become ready in {timeout:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str) -> tuple[int | None, str]:
    """Status and body of GET url; (None, "") while nothing answers."""
    try:  # a loopback poll of our own child: its (often self-signed) certificate is not the point here
        with urllib.request.urlopen(url, timeout=1.0, context=ssl._create_unverified_context()) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None, ""


# -- request handling -------------------------------------------------------------------------------------------

def _body(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its JSON itself (to bound its size and word its errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _parse(cls: type, body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"]) from e


def _tokenizer(model: Model) -> Any:
    if model.tokenizer is None:
        raise APIError(400, "this model has no tokenizer; text requests are not possible")
    return model.tokenizer


class _TokenText:
    """Token text for logprobs; `token_id:N` (vLLM's spelling) for a model without a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token) if self.tokenizer is not None else f"token_id:{token}"


def _model_card(name: str, model: Model) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(model.path.stat().st_mtime), "owned_by": "ternlm",
            "max_model_len": model.n_ctx}


def _masked_message(message: dict[str, Any], mask: Callable[[str], str]) -> dict[str, Any]:
    """The message with the PII filter applied to its text (string content or text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": mask(content)}
    if isinstance(content, list):
        return {**message, "content": [{**p, "text": mask(p["text"])} if isinstance(p, dict)
                                       and isinstance(p.get("text"), str) else p for p in content]}
    return message


def _active_tools(req: ChatRequest) -> list[dict[str, Any]]:
    if not req.tools or req.tool_choice == "none":
        return []
    return req.tools


def _tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system message that tells the model which tools exist and how to call one."""
    specs = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
    return ("You can call these functions: " + specs + "\nTo call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <arguments object>}; otherwise answer normally.')


def _chat_constraint(model: Model, req: ChatRequest, tools: list[dict[str, Any]]) -> object | None:
    if req.response_format is None and not tools:
        return None
    tok = _tokenizer(model)
    if tools:
        schema = grammar.tool_call_schema(tools, req.tool_choice)
        if schema is not None:
            return grammar.constraint_for({"type": "json_schema", "json_schema": {"name": "tool_call",
                                                                                  "schema": schema}},
                                          tok, model.config.vocab_size)
    if req.response_format is None:
        return None
    return grammar.constraint_for(req.response_format, tok, model.config.vocab_size)


def _tool_calls(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return grammar.parse_tool_calls(text, tools) if tools else None


async def _collect(stream: Stream, request: Request) -> list[GenerationEvent]:
    """All events of a non-streaming request; a client that hangs up cancels its generation."""
    events: list[GenerationEvent] = []
    try:
        while True:
            try:
                event = await stream.get(timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected") from None
                continue
            if event is None:
                return events
            events.append(event)
    finally:
        stream.cancel()


def _sse(chunks: AsyncIterator[dict[str, Any]], stream: Stream, keep_alive: float) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, `: keep-alive` while waiting, `data: [DONE]` at the end.

    A client that disconnects cancels the response task, which cancels the generation and frees its slot."""

    async def body() -> AsyncIterator[str]:
        queue_get = chunks.__anext__
        try:
            pending = asyncio.ensure_future(queue_get())
            while True:
                done, _ = await asyncio.wait({pending}, timeout=keep_alive)
                if not done:
                    yield ": keep-alive\n\n"
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    break
                except TernlmError as e:
                    yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
                    break
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                pending = asyncio.ensure_future(queue_get())
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()
            if not pending.done():
                pending.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Output:
    """The text a stream sends, through the PII masker when one is on, kept for the audit record."""

    def __init__(self, masker: StreamMasker | None, rec: access.RequestRecord,
                 count_pii: Callable[[dict[str, int], str], None]) -> None:
        self.masker, self.rec, self.count_pii, self.parts = masker, rec, count_pii, []

    def feed(self, text: str) -> str:
        out = self.masker.feed(text) if self.masker is not None else text
        self.parts.append(out)
        return out

    def finish(self, last: GenerationEvent | None) -> str:
        """The text still held back by the masker; records the completion."""
        tail = self.masker.flush() if self.masker is not None else ""
        self.parts.append(tail)
        if self.masker is not None:
            self.count_pii(self.masker.counts, "output")
        self.rec.completion = "".join(self.parts)
        self.rec.completion_tokens = last.completion_tokens if last else 0
        return tail


async def _chat_chunks(stream: Stream, head: dict[str, Any], req: ChatRequest, tools: list[dict[str, Any]],
                       n_prompt: int, tok: Any, masker: StreamMasker | None, rec: access.RequestRecord,
                       count_pii: Callable) -> AsyncIterator[dict[str, Any]]:
    head = {**head, "object": "chat.completion.chunk"}
    out = _Output(masker, rec, count_pii)

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    yield chunk({"role": "assistant", "content": ""})
    last, held = None, []  # with tools, the text is held until it is known whether it is a call
    async for event in stream:
        last = event
        logprobs = protocol.chat_logprobs([event], tok.token_text) if req.logprobs else None
        text = out.feed(event.text)
        if tools:
            held.append(text)
        else:
            yield chunk({"content": text}, logprobs=logprobs)
    tail = out.finish(last)
    if tail and not tools:
        yield chunk({"content": tail})
    finish = last.finish_reason if last else "stop"
    if tools:
        text = "".join(held) + tail
        calls = _tool_calls(text, tools)
        if calls:
            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
            finish = "tool_calls"
        elif text:
            yield chunk({"content": text})
    yield chunk({}, finish)
    if req.include_usage:
        yield {**head, "choices": [], "usage": protocol.usage(last, n_prompt)}


async def _completion_chunks(stream: Stream, head: dict[str, Any], req: CompletionRequest, n_prompt: int,
                             tok: Any, echo: str, masker: StreamMasker | None, rec: access.RequestRecord,
                             count_pii: Callable) -> AsyncIterator[dict[str, Any]]:
    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    out = _Output(masker, rec, count_pii)
    if echo:
        yield chunk(echo)
    last, offset = None, len(echo)
    async for event in stream:
        last = event
        logprobs = None
        if req.logprobs is not None:
            logprobs = protocol.completion_logprobs([event], tok.token_text, offset)
        text = out.feed(event.text)
        offset += len(text)
        yield chunk(text, logprobs=logprobs)  # one chunk per token, even one whose text is held back
    yield chunk(out.finish(last), last.finish_reason if last else "stop")
    if req.include_usage:
        yield {**head, "choices": [], "usage": protocol.usage(last, n_prompt)}


# -- errors and metrics ------------------------------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    def respond(status: int, message: str, type_: str, code: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return respond(e.status, e.message, e.type, e.code, e.headers)

    @app.exception_handler(ContextOverflowError)
    async def overflow(_: Request, e: ContextOverflowError) -> JSONResponse:
        return respond(400, str(e), "invalid_request_error", "context_length_exceeded")

    @app.exception_handler(OverloadedError)
    async def overloaded(_: Request, e: OverloadedError) -> JSONResponse:
        return respond(503, str(e), "server_error", "overloaded", {"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return respond(500, str(e), "server_error")

    @app.exception_handler(TernlmError)
    async def bad_request(_: Request, e: TernlmError) -> JSONResponse:
        return respond(400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=e)
        return respond(500, f"internal error: {type(e).__name__}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return respond(e.status_code, str(e.detail), "invalid_request_error", "not_found"
                       if e.status_code == 404 else None)


class _MetricsMiddleware:
    """Counts requests by route and status and times them to their last byte (streams included)."""

    def __init__(self, app: Callable, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.request_latency.labels(path).observe(time.perf_counter() - start)
