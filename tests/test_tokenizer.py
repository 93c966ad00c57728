"""Tokenizer loading, BOS handling and the UTF-8-safe stream decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm.errors import FormatError, TernlmError
from ternlm.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["Hello world!", "café 😀🎉 中文测试 日本語", "👍🏽🇫🇷 naïve", "", "  spaces  and\nnewlines\n"]


def stream(tok: Tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    dec = StreamDecoder(tok, context or ())
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_from_dir_reads_config(byte_tokenizer: Tokenizer) -> None:
    tok = byte_tokenizer
    assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") == 0
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|end_of_text|>"  # given as an AddedToken dict
    assert tok.eos_ids == {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")}
    assert tok.chat_template is not None and "messages" in tok.chat_template
    assert tok.vocab_size == 600
    assert tok.id_to_token(tok.bos_id) == "<|begin_of_text|>"
    assert tok.token_to_id("no-such-token") is None


@pytest.mark.parametrize("fixture", ["byte_tokenizer_dir", "byte_tokenizer_dir_plain"])
def test_bos_added_exactly_once(fixture: str, request: pytest.FixtureRequest) -> None:
    tok = Tokenizer.from_dir(request.getfixturevalue(fixture))
    bos = tok.bos_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == bos and (len(ids) == 1 or ids[1] != bos)
        assert tok.encode(text, add_bos=False) == ids[1:]
        assert tok.decode(ids) == text
        # BOS already written as text (as chat templates do) is not doubled.
        assert tok.encode("<|begin_of_text|>" + text) == ids
        assert tok.encode("<|begin_of_text|>" + text, add_bos=False) == ids


def test_bos_only_when_asked(tmp_path: Path, byte_tokenizer_dir_plain: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((byte_tokenizer_dir_plain / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token == "<|begin_of_text|>"  # known name, found in the vocab
    assert not tok.add_bos_token  # but neither a config nor the post-processor asks for it
    assert tok.encode("Hello") == tok.encode("Hello", add_bos=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert Tokenizer.from_dir(tmp_path).encode("Hello")[0] == tok.bos_id


def test_eos_from_generation_config_and_extra(tmp_path: Path, byte_tokenizer_dir_plain: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((byte_tokenizer_dir_plain / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": "y"}
        ]})
    )
    tok = Tokenizer.from_dir(tmp_path, extra_eos_ids=[9])
    assert {7, 8, 9, 1, 2} <= tok.eos_ids
    assert tok.chat_template == "y"


def test_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config_names_file(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((byte_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(FormatError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_encode_rejects_lone_surrogates(byte_tokenizer: Tokenizer) -> None:
    with pytest.raises(TernlmError, match="Unicode"):
        byte_tokenizer.encode("a\ud800")


def test_decode_skip_special(byte_tokenizer: Tokenizer) -> None:
    ids = [*byte_tokenizer.encode("Hi"), byte_tokenizer.token_to_id("<|eot_id|>")]
    assert byte_tokenizer.decode(ids) == "Hi"
    assert byte_tokenizer.decode(ids, skip_special=False) == "<|begin_of_text|>Hi<|eot_id|>"


def test_stream_never_emits_half_characters(byte_tokenizer: Tokenizer) -> None:
    text = "😀🎉 中文 👍🏽"
    ids = byte_tokenizer.encode(text, add_bos=False)
    assert len(ids) > len(text)  # some characters really are split across tokens
    pieces = stream(byte_tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stream_with_context_is_not_emitted(byte_tokenizer: Tokenizer) -> None:
    prompt = byte_tokenizer.encode("User: hi")
    ids = byte_tokenizer.encode(" café 😀", add_bos=False)
    assert "".join(stream(byte_tokenizer, ids, prompt)) == " café 😀"


def test_flush_reports_incomplete_bytes(byte_tokenizer: Tokenizer) -> None:
    lone = byte_tokenizer.token_to_id("ð")  # 0xF0: first byte of a 4-byte character, never completed
    ids = [*byte_tokenizer.encode("ok", add_bos=False), lone]
    pieces = stream(byte_tokenizer, ids)
    assert pieces[-1] == "\ufffd" and "".join(pieces) == byte_tokenizer.decode(ids)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_stream_equals_decode_random_ids(byte_tokenizer: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, byte_tokenizer.vocab_size - 1), max_size=40))
    assert "".join(stream(byte_tokenizer, ids)) == byte_tokenizer.decode(ids)


CHARS = st.sampled_from(list("ab 中文😀🎉👍🏽é\n")) | st.characters(exclude_categories=["Cs"])


@settings(max_examples=100, deadline=None)
@given(text=st.text(CHARS, max_size=30))
def test_stream_equals_text_round_trip(byte_tokenizer: Tokenizer, text: str) -> None:
    ids = byte_tokenizer.encode(text, add_bos=False)
    pieces = stream(byte_tokenizer, ids)
    assert "".join(pieces) == byte_tokenizer.decode(ids)
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)
