"""The generate loop driven by a scripted fake model: stop tokens, stop strings, limits, streaming text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from ternlm.errors import ContextOverflowError, TernlmError
from ternlm.generate import GenerationEvent, StopStrings, generate
from ternlm.sampling import SamplingParams
from ternlm.tokenizer import Tokenizer

SMILE = "😀".encode()
# Token pieces as raw bytes; two of them split one emoji between them.
PIECES = [b"Hel", b"lo wor", b"ld", b"!", b" ", b"a", b"b", SMILE[:2], SMILE[2:], "中".encode()]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>"]
GREEDY = SamplingParams(temperature=0.0)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    b2u = _byte_to_unicode()
    vocab: dict[str, int] = {}
    for piece in [bytes([b]) for b in range(256)] + PIECES:
        vocab.setdefault("".join(b2u[b] for b in piece), len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIALS)
    return Tokenizer(hf, bos_token=SPECIALS[0], eos_tokens=["<|eot_id|>"])


def ids_of(tok: Tokenizer, *pieces: bytes | str) -> list[int]:
    b2u = _byte_to_unicode()
    out = []
    for p in pieces:
        name = p if isinstance(p, str) else "".join(b2u[b] for b in p)
        token_id = tok.token_to_id(name)
        assert token_id is not None, p
        out.append(token_id)
    return out


class Script:
    """A fake model whose logits force `tokens` in order (then token 0 forever), recording its calls."""

    def __init__(self, vocab_size: int, tokens: list[int]) -> None:
        self.vocab_size, self.tokens = vocab_size, tokens
        self.calls: list[tuple[list[int], int]] = []

    def __call__(self, new_ids: list[int], start: int) -> np.ndarray:
        self.calls.append((list(new_ids), start))
        i = len(self.calls) - 1
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        logits[self.tokens[i] if i < len(self.tokens) else 0] = 10.0
        return logits


def run(
    tok: Tokenizer, tokens: list[int], max_tokens: int = 20, **kwargs
) -> tuple[list[GenerationEvent], Script]:
    script = Script(tok.vocab_size, tokens)
    prompt = kwargs.pop("prompt", [tok.bos_id, *ids_of(tok, b"a")])
    events = list(generate(script, tok, prompt, max_tokens=max_tokens, n_ctx=64, sampling=GREEDY, **kwargs))
    return events, script


def text(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events)


def test_eos_stops_and_emits_no_text(tok: Tokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    tokens = [*ids_of(tok, b"Hel", b"lo wor", b"ld"), eot, *ids_of(tok, b"a")]
    events, script = run(tok, tokens)
    assert [e.text for e in events] == ["Hel", "lo wor", "ld", ""]
    assert [e.finish_reason for e in events] == [None, None, None, "stop"]
    assert events[-1].token == eot and events[-1].completion_tokens == 4
    assert all(e.prompt_tokens == 2 for e in events)
    assert [e.token for e in events] == tokens[:4]
    assert all(e.logprob is not None and e.logprob <= 0 for e in events)
    # Prefill at 0, then one token at a time at the next position; the stop token is never fed back.
    prompt = [tok.bos_id, *ids_of(tok, b"a")]
    assert script.calls == [(prompt, 0), ([tokens[0]], 2), ([tokens[1]], 3), ([tokens[2]], 4)]


def test_ignore_eos_runs_to_length(tok: Tokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    tokens = [*ids_of(tok, b"Hel"), eot, *ids_of(tok, b"ld", b"!")]
    events, _ = run(tok, tokens, max_tokens=4, ignore_eos=True)
    assert text(events) == "Helld!" and events[-1].finish_reason == "length" and len(events) == 4


def test_explicit_stop_ids(tok: Tokenizer) -> None:
    tokens = ids_of(tok, b"Hel", b"!", b"ld")
    events, _ = run(tok, tokens, stop_ids={tokens[1]})
    assert text(events) == "Hel" and events[-1].finish_reason == "stop" and events[-1].token == tokens[1]


def test_max_tokens_gives_length(tok: Tokenizer) -> None:
    events, script = run(tok, ids_of(tok, b"Hel", b"lo wor", b"ld"), max_tokens=2)
    assert text(events) == "Hello wor" and [e.finish_reason for e in events] == [None, "length"]
    assert len(script.calls) == 2


def test_stop_string_across_tokens(tok: Tokenizer) -> None:
    events, _ = run(tok, ids_of(tok, b"Hel", b"lo wor", b"ld"), stop=["lo w"])
    assert [e.text for e in events] == ["He", "l"]  # "l" is held back until it cannot start "lo w"
    assert events[-1].finish_reason == "stop" and len(events) == 2


def test_stop_string_at_start(tok: Tokenizer) -> None:
    events, _ = run(tok, ids_of(tok, b"Hel", b"lo wor"), stop=["He"])
    assert [(e.text, e.finish_reason) for e in events] == [("", "stop")]


def test_held_text_released_when_stop_cannot_match(tok: Tokenizer) -> None:
    events, _ = run(tok, ids_of(tok, b"Hel", b"!", b"ld"), max_tokens=3, stop=["lo"])
    assert [e.text for e in events] == ["He", "l!", "ld"] and events[-1].finish_reason == "length"
    # A partial stop string at the end is text the user should see.
    events, _ = run(tok, ids_of(tok, b"Hel"), max_tokens=1, stop=["lo"])
    assert [(e.text, e.finish_reason) for e in events] == [("Hel", "length")]


def test_stop_string_completed_by_last_token(tok: Tokenizer) -> None:
    events, _ = run(tok, ids_of(tok, b"Hel", b"lo wor"), max_tokens=2, stop=["wor"])
    assert text(events) == "Hello " and events[-1].finish_reason == "stop"


def test_multibyte_split_across_tokens(tok: Tokenizer) -> None:
    tokens = ids_of(tok, b"a", SMILE[:2], SMILE[2:], "中".encode(), b"!")
    events, _ = run(tok, tokens)
    assert [e.text for e in events[:5]] == ["a", "", "😀", "中", "!"]
    events, _ = run(tok, tokens, stop=["😀中"])
    assert text(events) == "a" and events[-1].finish_reason == "stop"


def test_incomplete_character_at_the_end(tok: Tokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    events, _ = run(tok, [*ids_of(tok, b"a", SMILE[:2]), eot])
    assert text(events) == tok.decode(ids_of(tok, b"a", SMILE[:2])) and events[-1].text.endswith("\ufffd")


def test_errors_before_any_work(tok: Tokenizer) -> None:
    script = Script(tok.vocab_size, [])
    with pytest.raises(ContextOverflowError, match=r"3 tokens.*max_tokens 8.*11.*10"):
        generate(script, tok, [1, 2, 3], max_tokens=8, n_ctx=10, sampling=GREEDY)
    with pytest.raises(TernlmError, match="empty"):
        generate(script, tok, [], max_tokens=1, n_ctx=10, sampling=GREEDY)
    with pytest.raises(TernlmError, match="max_tokens"):
        generate(script, tok, [1], max_tokens=0, n_ctx=10, sampling=GREEDY)
    with pytest.raises(TernlmError, match="stop"):
        generate(script, tok, [1], max_tokens=1, n_ctx=10, sampling=GREEDY, stop="x")  # type: ignore[arg-type]
    assert script.calls == []
    events = list(generate(script, tok, [1, 2], max_tokens=8, n_ctx=10, sampling=GREEDY))
    assert len(events) == 8  # exactly fits


def test_close_early(tok: Tokenizer) -> None:
    script = Script(tok.vocab_size, ids_of(tok, b"Hel", b"lo wor", b"ld"))
    gen = generate(script, tok, [tok.bos_id], max_tokens=10, n_ctx=64, sampling=GREEDY)
    assert next(gen).text == "Hel"
    gen.close()
    assert len(script.calls) == 1
    with pytest.raises(StopIteration):
        next(gen)


def test_seeded_sampling_is_reproducible(tok: Tokenizer) -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(size=(32, tok.vocab_size)).astype(np.float32) * 3

    def step(new_ids: list[int], start: int) -> np.ndarray:
        return table[(start + len(new_ids)) % 32]

    def tokens(seed: int) -> list[int | None]:
        params = SamplingParams(temperature=1.0, top_k=50, seed=seed)
        return [e.token for e in generate(step, tok, [1], max_tokens=20, n_ctx=64, sampling=params,
                                          ignore_eos=True)]

    assert tokens(5) == tokens(5) != tokens(6)


def test_stop_strings_unit() -> None:
    s = StopStrings(["aab", "", "xyz"])
    assert s.feed("a") == ("", False)
    assert s.feed("a") == ("", False)
    assert s.feed("a") == ("a", False)
    assert s.feed("b") == ("", True)  # "aaab" shows as "a"


@settings(max_examples=200, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=12),
    stop=st.sampled_from([None, "lo", "d!", "😀", "a b", "ld", "\ufffd", "Hello world"]),
    max_tokens=st.integers(1, 14),
)
def test_streamed_text_equals_decoded_text(tok: Tokenizer, picks: list[int], stop: str | None,
                                           max_tokens: int) -> None:
    tokens = ids_of(tok, *[PIECES[i] for i in picks])
    events, _ = run(tok, tokens, max_tokens=max_tokens, stop=[stop] if stop else None, ignore_eos=True)
    full = tok.decode(tokens[:max_tokens] + [0] * max(0, max_tokens - len(tokens)))
    cut = full.find(stop) if stop else -1
    assert text(events) == (full[:cut] if cut >= 0 else full)
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == ("stop" if cut >= 0 else "length")
    if cut < 0:
        assert len(events) == max_tokens
