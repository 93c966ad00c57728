"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn process.

Greedy answers are checked against the library's own single-sequence generate(): the server's batched
engine must produce the same tokens. The shipped model is random, so texts are noise but deterministic.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import ternlm
from ternlm.sampling import log_softmax
from ternlm.server import serve_subprocess
from tiny_models import toy_model_path

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
NO_EOS = {"ignore_eos": True}

# The toy model: a 2048-token context for the long-prompt tests, and outputs that are cheap to compute.
SERVER_OPTS = ["--threads", "1", "--log-level", "warning"]
SERVER_ARGS = [str(toy_model_path()), *SERVER_OPTS]


@pytest.fixture(scope="module")
def model() -> ternlm.Model:
    return ternlm.load(toy_model_path())


@pytest.fixture(scope="module")
def url() -> str:
    with serve_subprocess([*SERVER_ARGS, "--slots", "4"]) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy(model: ternlm.Model, prompt, n: int, **kw) -> str:
    return "".join(e.text for e in model.generate(prompt, n, temperature=0.0, ignore_eos=True, **kw))


def test_models_and_health(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == ["default"]
    assert client.models.retrieve("default").id == "default"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200


def test_chat_matches_library(client: openai.OpenAI, model: ternlm.Model) -> None:
    r = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=12, temperature=0,
                                       extra_body=NO_EOS)
    prompt = model.chat_tokens(MESSAGES)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(model, prompt, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 12)
    assert r.usage.total_tokens == len(prompt) + 12


def test_chat_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = {"model": "default", "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "extra_body": NO_EOS}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completions_text_and_ids(client: openai.OpenAI, model: ternlm.Model) -> None:
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=9, temperature=0,
                                  extra_body=NO_EOS)
    assert r.choices[0].text == greedy(model, "Once upon a time", 9)
    ids = model.tokenizer.encode("Once upon a time")
    r2 = client.completions.create(model="default", prompt=ids, max_tokens=9, temperature=0, echo=True,
                                   extra_body=NO_EOS)
    assert r2.choices[0].text == model.tokenizer.decode(ids) + r.choices[0].text
    streamed = client.completions.create(model="default", prompt="Once upon a time", max_tokens=9,
                                         temperature=0, stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_stop_string_cuts_text(client: openai.OpenAI, model: ternlm.Model) -> None:
    full = greedy(model, "Once upon a time", 24)
    stop = full[10:13]
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=24, temperature=0,
                                  stop=[stop, "\x00never"], extra_body=NO_EOS)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model="default", prompt="Once", max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body=NO_EOS).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_logprobs_are_the_models(client: openai.OpenAI, model: ternlm.Model) -> None:
    r = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=4, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    prompt = model.chat_tokens(MESSAGES)
    expected = log_softmax(model.logits(prompt)[-1])
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    assert first.top_logprobs[0].logprob == pytest.approx(expected.max(), abs=1e-4)
    assert first.logprob == pytest.approx(expected.max(), abs=1e-4)  # greedy took the top token
    assert first.token == model.tokenizer.token_text(int(np.argmax(expected)))


@pytest.mark.parametrize(("call", "status", "code"), [
    ({"model": "nope"}, 404, "model_not_found"),
    ({"max_tokens": 5000}, 400, "context_length_exceeded"),
    ({"temperature": -1}, 400, None),
    ({"n": 2}, 400, None),
    ({"messages": []}, 400, None),
    ({"messages": [{"content": "no role"}]}, 400, None),
])
def test_errors_in_openai_shape(client: openai.OpenAI, call: dict, status: int, code: str | None) -> None:
    kw = {"model": "default", "messages": MESSAGES, "max_tokens": 4} | call
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kw)
    assert info.value.status_code == status
    body = info.value.response.json()["error"]
    assert body["message"] and body["type"]
    if code:
        assert body["code"] == code


def test_raw_http_errors(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": "default", "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    r = httpx.post(url + "/v1/chat/completions", content=big.encode())
    assert r.status_code == 413
    assert httpx.get(url + "/v1/nothing").status_code == 404


def test_tokenize_roundtrip(url: str, model: ternlm.Model) -> None:
    r = httpx.post(url + "/tokenize", json={"content": "Hello there"}).json()
    assert r["tokens"] == model.tokenizer.encode("Hello there") and r["count"] == len(r["tokens"])
    back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["content"] == "Hello there"
    assert httpx.post(url + "/detokenize", json={"tokens": [10 ** 9]}).status_code == 400


def test_eight_concurrent_clients_get_their_own_answers(client: openai.OpenAI, model: ternlm.Model) -> None:
    prompts = [f"Story number {i}:" for i in range(8)]
    expected = [greedy(model, p, 20) for p in prompts]
    got: list[str | None] = [None] * 8

    def call(i: int) -> None:
        got[i] = client.completions.create(model="default", prompt=prompts[i], max_tokens=20, temperature=0,
                                           extra_body=NO_EOS).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_prefix_cache_reports_cached_tokens_and_is_faster(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 60}  # about 1,700 byte tokens

    def ask(question: str) -> tuple[int, float]:
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model="default", messages=[system, {"role": "user", "content": question}], max_tokens=2,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS)
        ttft = None
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
            if chunk.usage:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        return cached, ttft

    cold_cached, cold = ask("First question?")
    warm_cached, warm = ask("Second one?")
    assert warm_cached > 1000 > cold_cached
    assert warm < cold


def test_metrics_count_requests(url: str, client: openai.OpenAI) -> None:
    client.completions.create(model="default", prompt="Hi", max_tokens=2, extra_body=NO_EOS)
    text = httpx.get(url + "/metrics").text
    assert 'ternlm_requests_total{route="/v1/completions",status="200"}' in text
    assert "ternlm_time_to_first_token_seconds_bucket" in text
    assert "ternlm_generation_tokens_total" in text


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_disconnect_frees_slot_and_full_queue_answers_503() -> None:
    with serve_subprocess([*SERVER_ARGS, "--slots", "1", "--queue-size", "1", "--keep-alive", "0.001"]) as url:
        long_prefill = {"model": "default", "prompt": "x" * 1500, "max_tokens": 2, "stream": True}
        lines = [x for x in httpx.post(url + "/v1/completions", json=long_prefill, timeout=30).iter_lines() if x]
        assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"  # the prefill outlasted 1 ms

        body = {"model": "default", "prompt": "x", "max_tokens": 2000, "stream": True, "ignore_eos": True,
                "logprobs": 0}  # a chunk per token, even for tokens without text
        with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the stream
            next(line for line in lines if line.startswith("data: {"))
            assert _metric(url, "ternlm_active_slots") == 1
            # The only slot is busy: one request may wait, the next is turned away.
            waiting = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                       kwargs={"json": {**body, "stream": False, "max_tokens": 2}, "timeout": 60})
            waiting.start()
            _wait_for(lambda: _metric(url, "ternlm_queue_depth") == 1)
            busy = httpx.post(url + "/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["code"] == "overloaded"
        # The client hung up mid-stream: its generation stops long before 2,000 tokens, the slot frees,
        # and the waiting request runs.
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        _wait_for(lambda: _metric(url, "ternlm_active_slots") == 0)
        assert _metric(url, "ternlm_generation_tokens_total") < 1000


def test_serve_settings_flag_over_env_over_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ternlm.cli import _read_config, build_parser

    config = tmp_path / "ternlm.toml"
    config.write_text('port = 9000\nslots = 3\nqueue_size = 5\nhead = "q4_0"\nkeep-alive = 2.5\n')
    argv = ["serve", "--config", str(config), "--slots", "2"]
    monkeypatch.setenv("TERNLM_QUEUE_SIZE", "7")
    args = build_parser(_read_config(argv)).parse_args(argv)
    assert (args.port, args.slots, args.queue_size, args.head, args.keep_alive) == (9000, 2, 7, "q4_0", 2.5)
    assert args.host == "127.0.0.1"  # loopback unless asked


@pytest.mark.parametrize(("text", "error"), [("slots = 'many'\n", "slots"), ("colour = 1\n", "unknown setting"),
                                             ("port = \n", "config file")])
def test_serve_config_errors_are_clear(tmp_path, capsys: pytest.CaptureFixture, text: str, error: str) -> None:
    from ternlm.cli import main

    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["serve", "--config", str(config)]) == 1
    assert error in capsys.readouterr().err


def test_serve_help_documents_every_flag_and_default(capsys: pytest.CaptureFixture) -> None:
    from ternlm.cli import SERVE_OPTIONS, main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, _, default, _ in SERVE_OPTIONS:
        assert f"--{flag}" in text and f"TERNLM_{flag.upper().replace('-', '_')}" in text
        assert f"default {'off' if default is False else default})" in text


def test_json_object_and_schema_outputs_parse(client: openai.OpenAI) -> None:
    # The random model writes endless strings inside an unbounded object; the schema below bounds them.
    r = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=20, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "rank": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "rank"], "additionalProperties": False}
    r = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=300, temperature=0.7, seed=2,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "place", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"  # the grammar ended it, not max_tokens
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city", "rank"} and isinstance(value["rank"], int) and len(value["city"]) <= 12


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_in_openai_shape(client: openai.OpenAI, stream: bool) -> None:
    kw = {"model": "default", "messages": MESSAGES, "max_tokens": 200, "temperature": 0.7, "seed": 3,
          "tools": [WEATHER], "tool_choice": "required"}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(deltas) == 1
        call = deltas[0].tool_calls[0]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        call = r.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_bad_response_format_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "bad name!"}})


def test_token_id_completions_without_tokenizer(tmp_path) -> None:
    import shutil

    from ternlm.api import default_model_path

    for name in ("config.json", "model.safetensors"):
        shutil.copy(default_model_path() / name, tmp_path / name)
    with serve_subprocess([*SERVER_OPTS, str(tmp_path)]) as url:
        body = {"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True, "logprobs": 1, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body).json()
        assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["text"] == ""
        assert all(t.startswith("token_id:") for t in r["choices"][0]["logprobs"]["tokens"])
        lines = httpx.post(url + "/v1/completions", json={**body, "stream": True}).iter_lines()
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["logprobs"]) == 5
        text = httpx.post(url + "/v1/completions", json={**body, "prompt": "words"})
        assert text.status_code == 400 and "tokenizer" in text.json()["error"]["message"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_failure_fails_requests_and_health(model: ternlm.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from ternlm.server import create_app

    with TestClient(create_app(model)) as http:
        _wait_for(lambda: http.get("/ready").status_code == 200)
        engine = http.app.state.ternlm.engine
        monkeypatch.setattr(engine, "_step", lambda: 1 / 0)  # a bug inside the engine thread
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 500 and "engine stopped: ZeroDivisionError" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 500
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 503


def test_serve_reports_a_model_that_fails_to_load(tmp_path) -> None:
    from ternlm.errors import TernlmError

    with pytest.raises(TernlmError, match="could not load the model"), \
            serve_subprocess([*SERVER_OPTS, str(tmp_path / "missing")]):
        pass
