"""Shared fixtures: tiny artefacts built in tmp_path, never downloaded."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# ternlm keeps API keys and secrets under $TERNLM_HOME (default ~/.ternlm): tests, and the servers they start,
# must never see the developer's own keys.
os.environ["TERNLM_HOME"] = tempfile.mkdtemp(prefix="ternlm-test-home-")

# --- byte-level BPE tokenizer (Llama-3 style special tokens), used by tokenizer/chat/generate tests ---

BYTE_TOKENIZER_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")

_BYTE_TOKENIZER_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "BitNet b1.58 models store every weight as -1, 0 or +1 and run fast on ordinary CPUs.",
    "System: Be brief. User: Hi there. Assistant: Hello, how can I help you today?",
    "Ternary weights, int8 activations, and a tied embedding head: that is the whole trick.",
    "日本語のテキストも少し入れておきます。東京は大きな都市です。",
    "中文分词测试：你好，世界！我们在测试流式解码。",
    "Emoji time 😀🎉👍🏽 and flags 🇫🇷 plus accents: café, naïve, Zürich, Ελληνικά, русский.",
    "def f(x):\n    return x * 2  # code with    spaces\n\n",
]


def build_byte_tokenizer(out_dir: Path, *, post_bos: bool, config: dict | None) -> Path:
    """Train a ~600-id byte-level BPE on in-test text and write tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(BYTE_TOKENIZER_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_BYTE_TOKENIZER_TEXT * 3, trainer=trainer)
    bos = BYTE_TOKENIZER_SPECIALS[0]
    if post_bos:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    if config is not None:
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-3-like: post-processor adds BOS; config names bos/eos (eos as an AddedToken dict)."""
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>", "special": True},
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    return build_byte_tokenizer(tmp_path_factory.mktemp("byte_tok_bos"), post_bos=True, config=config)


@pytest.fixture(scope="session")
def byte_tokenizer_dir_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No post-processor; tokenizer_config.json asks for BOS via add_bos_token."""
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}
    return build_byte_tokenizer(tmp_path_factory.mktemp("byte_tok_plain"), post_bos=False, config=config)


@pytest.fixture(scope="session")
def byte_tokenizer(byte_tokenizer_dir: Path):
    from ternlm.tokenizer import Tokenizer

    return Tokenizer.from_dir(byte_tokenizer_dir)
