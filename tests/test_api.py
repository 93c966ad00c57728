"""The public API and the command line, on the model ternlm ships."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ternlm
from ternlm import kernels
from ternlm.cli import main
from tiny_models import toy_model_path


@pytest.fixture(scope="module")
def model() -> ternlm.Model:
    return ternlm.load()


def test_logits_shape_and_determinism(model: ternlm.Model) -> None:
    a = model.logits([1, 2, 3])
    assert a.shape == (3, model.config.vocab_size) and a.dtype == np.float32
    np.testing.assert_array_equal(a, model.logits([1, 2, 3]))
    # causal: a token's logits do not depend on the tokens after it
    np.testing.assert_allclose(model.logits([1, 2, 3, 4, 5])[:3], a, rtol=1e-5, atol=1e-5)


def test_logits_rejects_bad_ids(model: ternlm.Model) -> None:
    with pytest.raises(ternlm.ShapeError):
        model.logits([])
    with pytest.raises(ternlm.ShapeError, match="token ids"):
        model.logits([0, model.config.vocab_size])
    with pytest.raises(ternlm.ShapeError):
        model.logits([[1, 2]])


def test_generate_greedy_follows_argmax(model: ternlm.Model) -> None:
    prompt = model.tokenizer.encode("Hi")
    events = list(model.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True))
    tokens = [e.token for e in events]
    for i, tok in enumerate(tokens):  # each token is the argmax of a full forward pass over what precedes it
        assert tok == int(model.logits(prompt + tokens[:i])[-1].argmax())
    assert events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == model.tokenizer.decode(tokens)


def test_generate_seed_reproducible(model: ternlm.Model) -> None:
    def run(seed: int) -> list[int]:
        return [e.token for e in model.generate("Hello", max_tokens=12, temperature=1.0, seed=seed,
                                                 ignore_eos=True)]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_context_overflow_is_clear() -> None:
    small = ternlm.load(n_ctx=16)
    with pytest.raises(ternlm.ContextOverflowError, match="16"):
        small.generate("Hello", max_tokens=20)


def test_chat_uses_bitnet_template(model: ternlm.Model) -> None:
    ids = model.chat_tokens([{"role": "user", "content": "Hi"}])
    assert model.tokenizer.decode(ids, skip_special=False) == "<|begin_of_text|>User: Hi<|eot_id|>Assistant: "


def test_info_reports_sizes(model: ternlm.Model) -> None:
    info = model.info()
    assert info["arch"] == "bitnet" and info["layers"] == model.config.n_layers and info["tied_embeddings"]
    assert info["ternary_bytes"] == sum(lin.packed.nbytes for layer in model.weights.layers
                                        for lin in layer.linears())


def test_cli_run_streams_and_summarises(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "-p", "Hello", "-n", "8", "--temperature", "0", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert "generated 8 tok" in err and "tok/s" in err and "threads" in err
    model = ternlm.load()
    expected = "".join(e.text for e in model.generate("Hello", 8, temperature=0.0, ignore_eos=True))
    assert out.rstrip("\n") == expected.rstrip("\n")


def test_cli_reports_errors_without_traceback(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tmp_path / "missing"), "-p", "x"]) == 1
    assert "ternlm: error:" in capsys.readouterr().err


def test_cli_chat_session() -> None:
    """A real subprocess: two turns, a reset, then exit."""
    proc = subprocess.run([sys.executable, "-m", "ternlm", "chat", "-n", "4", "--temperature", "0"],
                          input="Hi\nHow are you?\n/reset\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 3


def test_cli_info(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "arch" in out and "bitnet" in out and "bytes_per_token" in out


def test_q8_head_is_close_to_float_head() -> None:
    """The default Q8_0 head (and tied embedding) moves logits by a few % of their spread (int8 activation
    roundings flip downstream of the quantized embedding), and keeps the argmax almost everywhere."""
    exact, q8 = ternlm.load(head="float"), ternlm.load()
    assert q8.info()["head_dtype"] == "Q8_0" and exact.info()["head_dtype"] in ("F16", "F32")
    assert q8.info()["head_bytes"] < 0.55 * exact.info()["head_bytes"]
    tokens = list(np.random.default_rng(0).integers(0, 256, 200))
    a, b = exact.logits(tokens), q8.logits(tokens)
    rel = np.abs(a - b).mean(axis=-1) / a.std()
    assert np.median(rel) < 0.1, np.median(rel)  # measured 0.036; a wrong scale or layout gives ~1
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.9
    with pytest.raises(ternlm.TernlmError, match="head"):
        ternlm.load(head="q3")


def test_q4_head_is_close_to_float_head() -> None:
    """head="q4_0" (and the tied embedding) on the shipped model: logits move by about 5x the Q8_0
    head's error (measured median 0.19 of their spread vs 0.036) and keep the argmax at ~64 % of
    positions on this tiny random-weight model; a wrong scale or layout gives ~1."""
    exact, q4 = ternlm.load(head="float"), ternlm.load(head="q4_0")
    assert q4.info()["head_dtype"] == "Q4_0"
    assert q4.info()["head_bytes"] < 0.3 * exact.info()["head_bytes"]  # 0.28125: 4.5 bits per weight
    tokens = list(np.random.default_rng(0).integers(0, 256, 200))
    a, b = exact.logits(tokens), q4.logits(tokens)
    rel = np.abs(a - b).mean(axis=-1) / a.std()
    assert np.median(rel) < 0.3, np.median(rel)
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.5


def test_decode_batch_equals_separate_decodes(model: ternlm.Model) -> None:
    """Three sequences at different positions decoded in one batch give each one's own logits."""
    from ternlm.kvcache import KVCache

    t = model.transformer
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7, 7, 7, 7, 7]]
    caches = [KVCache(model.config, 32) for _ in prompts]
    for cache, prompt in zip(caches, prompts, strict=True):
        t.forward(np.array(prompt), cache, 0)
    alone = []
    for prompt in prompts:
        cache = KVCache(model.config, 32)
        t.forward(np.array(prompt), cache, 0)
        alone.append(t.forward(np.array([11]), cache, len(prompt))[0])
    batched = t.decode_batch(np.array([11, 11, 11]), caches, [len(p) for p in prompts])
    # Activations are quantized per token, so batching changes no rounding: equal up to float reordering.
    np.testing.assert_allclose(batched, np.stack(alone), rtol=1e-5, atol=1e-5)
    with pytest.raises(ternlm.ShapeError):
        t.decode_batch(np.array([1, 2]), caches, [1, 2, 3])


def test_forward_batch_mixes_prompt_chunks_and_decodes(model: ternlm.Model) -> None:
    """A step of two one-token decodes and two prompt chunks gives each sequence the logits of its own
    forward pass, and leaves each cache as that pass would."""
    from ternlm.kvcache import KVCache

    t = model.transformer
    history = [[1, 2, 3, 4, 5], [], [9, 8], [6]]
    chunks = [np.array([11]), np.array([3, 1, 4, 1, 5]), np.array([12]), np.array([2, 7])]
    caches = [KVCache(model.config, 32) for _ in history]
    alone = []
    for cache, past, chunk in zip(caches, history, chunks, strict=True):
        ref = KVCache(model.config, 32)
        for c in (cache, ref) if past else ():
            t.forward(np.array(past), c, 0)
        alone.append((t.forward(chunk, ref, len(past), last_only=True)[0], ref))
    batched = t.forward_batch(chunks, caches, [len(p) for p in history])
    assert batched.shape == (4, model.config.vocab_size)
    # Activations are quantized per token and every kernel sums in a fixed order: the same bits.
    for j, (logits, ref) in enumerate(alone):
        np.testing.assert_array_equal(batched[j], logits)
        n = len(history[j]) + len(chunks[j])
        np.testing.assert_array_equal(caches[j].k[:, :, :n], ref.k[:, :, :n])
        np.testing.assert_array_equal(caches[j].v[:, :, :n], ref.v[:, :, :n])
    with pytest.raises(ternlm.ShapeError):
        t.forward_batch([np.array([1]), np.array([], dtype=np.int64)], caches[:2], [0, 0])


def test_tq1_weights_give_identical_logits() -> None:
    """The 1.6-bit layout holds the same ternary values: the same logits (prefill and decode). On the toy
    model, whose 640-wide FFN the 2-bit layout pads to 768 and the 1.6-bit one does not pad."""
    model, tq1 = ternlm.load(toy_model_path()), ternlm.load(toy_model_path(), weights="tq1")
    info, base = tq1.info(), model.info()
    assert info["ternary_layout"] == "tq1" and base["ternary_layout"] == "i2"
    assert info["ternary_bytes"] == sum(lin.packed.nbytes for layer in tq1.weights.layers for lin in layer.linears())
    assert info["ternary_bytes"] < base["ternary_bytes"]
    for a, b in zip([lin for layer in model.weights.layers for lin in layer.linears()],
                    [lin for layer in tq1.weights.layers for lin in layer.linears()], strict=True):
        np.testing.assert_array_equal(a.codes(), b.codes())
        assert b.to_layout("i2").packed.tobytes() == a.packed.tobytes()
    ids = list(range(1, 70))
    np.testing.assert_array_equal(tq1.logits(ids), model.logits(ids))
    want = [e.token for e in model.generate(ids[:5], 6, temperature=0.0, ignore_eos=True)]
    assert [e.token for e in tq1.generate(ids[:5], 6, temperature=0.0, ignore_eos=True)] == want
    with pytest.raises(ternlm.TernlmError):
        ternlm.load(weights="tq2")


def test_cli_weights_flag(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["info", "--weights", "tq1"]) == 0
    assert "tq1" in capsys.readouterr().out
    monkeypatch.setenv("TERNLM_WEIGHTS", "tq1")
    assert main(["info"]) == 0
    assert "tq1" in capsys.readouterr().out


def test_generate_token_ids_without_tokenizer(tmp_path) -> None:
    """A checkpoint without tokenizer.json still generates from token ids (events carry ids, no text)."""
    import shutil

    path = tmp_path / "m"
    shutil.copytree(ternlm.api.default_model_path(), path)
    (path / "tokenizer.json").unlink()
    bare, full = ternlm.load(path), ternlm.load()
    events = list(bare.generate([1, 2, 3], max_tokens=5, temperature=0.0, ignore_eos=True))
    expected = [e.token for e in full.generate([1, 2, 3], max_tokens=5, temperature=0.0, ignore_eos=True)]
    assert [e.token for e in events] == expected and all(e.text == "" for e in events)
    with pytest.raises(ternlm.FormatError, match="tokenizer"):
        bare.generate("text", max_tokens=2)
    with pytest.raises(ternlm.TernlmError, match="stop strings"):
        bare.generate([1, 2], max_tokens=2, stop=["x"])


def test_blocked_prefill_attention_matches_decode_attention(model: ternlm.Model) -> None:
    """300 queries span several prefill attention blocks; every position must equal the C decode kernel's
    attention over the same cache. (Compared below the int8 quantization: whole-model logits of this
    random model are chaotic, one flipped rounding moves every later position by ~1e-2.)"""
    from ternlm.kvcache import KVCache

    c, t = model.config, model.transformer
    qkv = np.random.default_rng(5).standard_normal((300, c.q_dim + 2 * c.kv_dim)).astype(np.float32)
    start = 7  # a prompt continuing an earlier one
    prefill_cache, decode_cache = KVCache(c, 400), KVCache(c, 400)
    past = np.random.default_rng(6).standard_normal(prefill_cache.k[0, :, :start].shape).astype(np.float32)
    for cache in (prefill_cache, decode_cache):
        cache.k[0, :, :start] = cache.v[0, :, :start] = past
    blocked = t.attention_prefill(qkv, 0, prefill_cache, start)
    one_by_one = np.stack([
        kernels.attention_decode(qkv[j], decode_cache.k[0], decode_cache.v[0], start + j, t.rope.cos[start + j],
                                 t.rope.sin[start + j], c.n_heads, t.scale, decode_cache.scores)
        for j in range(len(qkv))])
    np.testing.assert_allclose(blocked, one_by_one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prefill_cache.k, decode_cache.k, rtol=1e-6, atol=1e-6)
    threads = kernels.get_threads()
    try:  # the blocks run on the kernels' thread count; which thread takes a block must not matter
        for n in (1, 3):
            kernels.set_threads(n)
            np.testing.assert_array_equal(t.attention_prefill(qkv, 0, prefill_cache, start), blocked)
    finally:
        kernels.set_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_prefill_in_a_forked_child(model: ternlm.Model) -> None:
    """A process forked after a prefill has none of the parent's attention threads; its own prefill must start
    new ones (it hung waiting on the parent's), and give the same logits."""
    threads = kernels.get_threads()
    kernels.set_threads(2)
    try:
        ids = list(range(1, 150))  # > one 64-query block: several items of work
        expect = model.logits(ids)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if np.array_equal(model.logits(ids), expect) else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's prefill did not finish in 60 s")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        kernels.set_threads(threads)
