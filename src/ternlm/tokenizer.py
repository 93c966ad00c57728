"""Text ↔ token ids through the `tokenizers` library, plus UTF-8-safe streaming detokenization."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from ternlm.errors import FormatError, TernlmError

# Turn/text terminators of the common chat families; each counts as EOS when the vocab has it.
KNOWN_EOS_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "</s>")
# Used as BOS when the checkpoint's config names none.
KNOWN_BOS_TOKENS = ("<|begin_of_text|>", "<s>")

# How many ids of already-emitted text the stream decoder re-decodes as context (SentencePiece-style
# decoders drop or add a leading space depending on what precedes a token).
_CONTEXT_IDS = 5


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict `{"content": ...}`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _ids(value: Any) -> list[int]:
    """`eos_token_id` in config.json / generation_config.json is an int, a list of ints or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_chat_template(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {name, template} of which we take "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS/template facts that live beside it in the checkpoint."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_tokens: Iterable[str] = (),
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tok
        self.chat_template = chat_template
        if bos_token is None:
            bos_token = next((b for b in KNOWN_BOS_TOKENS if tok.token_to_id(b) is not None), None)
        known_bos = bos_token is not None and tok.token_to_id(bos_token) is not None
        self.bos_token = bos_token if known_bos else None
        self.bos_id = tok.token_to_id(self.bos_token) if self.bos_token is not None else None

        eos_names = [e for e in eos_tokens if tok.token_to_id(e) is not None]
        self.eos_token = eos_names[0] if eos_names else None
        eos = {tok.token_to_id(e) for e in (*eos_names, *KNOWN_EOS_TOKENS)}
        self.eos_ids: set[int] = {i for i in eos if i is not None} | set(extra_eos_ids)

        # With no explicit add_bos_token, follow the tokenizer.json post-processor, as transformers does.
        self.add_bos_token = self._post_processor_adds_bos() if add_bos_token is None else add_bos_token

    @classmethod
    def from_dir(cls, path: Path | str, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Load tokenizer.json and the optional tokenizer_config.json / special_tokens_map.json /
        generation_config.json of a checkpoint directory. `extra_eos_ids` are added to `eos_ids`
        (e.g. the model config's `eos_token_id`)."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FormatError(f"{tj}: tokenizer.json not found")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises plain Exception for every kind of bad file
            raise FormatError(f"{tj}: cannot be read as a tokenizers file ({e})") from e

        config = _read_json(path / "tokenizer_config.json") or {}
        special_map = _read_json(path / "special_tokens_map.json") or {}
        gen_config = _read_json(path / "generation_config.json") or {}

        bos = _token_text(config.get("bos_token")) or _token_text(special_map.get("bos_token"))
        eos_tokens = [
            t for t in (_token_text(config.get("eos_token")), _token_text(special_map.get("eos_token"))) if t
        ]
        add_bos = config.get("add_bos_token")
        return cls(
            tok,
            bos_token=bos,
            eos_tokens=eos_tokens,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            chat_template=_pick_chat_template(config.get("chat_template")),
            extra_eos_ids=[*_ids(gen_config.get("eos_token_id")), *extra_eos_ids],
        )

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_id

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model's embedding may be padded larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. With `add_bos`, BOS is prepended once when the checkpoint wants one
        (`add_bos_token`, else its post-processor) and the text does not already start with it;
        chat prompts whose template writes BOS as text should pass `add_bos=False`."""
        # The post-processor is bypassed so BOS is added in one place only, never twice.
        if not isinstance(text, str):
            raise TernlmError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError as e:  # lone surrogates ("\ud800", possible via JSON escapes) are not encodable
            raise TernlmError(f"text is not valid Unicode (lone surrogate?): {e}") from e
        if add_bos and self.add_bos_token and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, …) are left out unless `skip_special` is False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def to_json(self) -> str:
        """The tokenizer as Hugging Face tokenizer.json text (for libraries that build their own view of it)."""
        return self._tok.to_str()

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own, special tokens included (for logprobs)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class StreamDecoder:
    """Incremental detokenizer: `push` one id at a time and get only text that is final.

    Byte-level BPE can split one UTF-8 character over several tokens; decoding such a prefix yields
    U+FFFD, so text is held back until it no longer ends in one. Each step re-decodes a short window
    (the last emitted tokens plus the new ones) and emits only what extends the window's old text,
    which also keeps decoders that treat leading spaces specially consistent with a full `decode`.
    The concatenation of all pushes and `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        # `context` (e.g. the prompt's last ids) is decoded as a prefix but never emitted.
        self._tok = tokenizer
        self._ids: list[int] = list(context[-_CONTEXT_IDS:]) if context else []
        self._prefix = 0  # start of the re-decoded window
        self._read = len(self._ids)  # end of the text already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it finalizes (often "", never half a character)."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            # The ids just emitted become the next window's context; older ones are no longer needed.
            del self._ids[: self._read]
            self._prefix, self._read = 0, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD, as in `decode`)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
