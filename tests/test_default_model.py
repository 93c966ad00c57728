"""The trained model ternlm ships: the engine scores held-out text as the PyTorch training code does, far
better than a unigram model, and `ternlm run` writes English words."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

import ternlm
from ternlm import evaluate
from ternlm.api import default_model_path
from ternlm.cli import main as cli_main

# Moby-Dick chapters 1-3: the shipped model was trained without any of Moby-Dick.
HELDOUT = Path(__file__).parent / "data" / "moby-dick-ch1-3.txt"


@pytest.fixture(scope="module")
def text() -> str:
    return HELDOUT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def engine_ppl(text: str) -> float:
    return evaluate.perplexity(ternlm.load(), text, ctx=512, stride=256).perplexity


@pytest.mark.oracle
@pytest.mark.parametrize("head", ["q8_0", "float"])
def test_engine_perplexity_equals_the_training_codes(text: str, head: str) -> None:
    pytest.importorskip("torch", reason="the PyTorch side of the check needs torch")
    from ternlm import qat
    from ternlm.train import load_for_training

    engine = ternlm.load(head=head)
    torch_model = qat.Scorer(load_for_training(default_model_path()), engine.tokenizer, default_model_path())
    got = evaluate.perplexity(engine, text, ctx=512, stride=256)
    ref = evaluate.perplexity(torch_model, text, ctx=512, stride=256)
    assert got.tokens == ref.tokens > 10_000
    assert abs(got.perplexity / ref.perplexity - 1) < 0.01, (got.perplexity, ref.perplexity)


def test_far_below_a_unigram_model_of_the_text_itself(text: str, engine_ppl: float) -> None:
    # The unigram model is fitted on the very text it scores, which flatters it; the model still wins by far.
    ids = ternlm.load().tokenizer.encode(text, add_bos=False)
    counts = Counter(ids)
    unigram = math.exp(-sum(c * math.log(c / len(ids)) for c in counts.values()) / len(ids))
    assert engine_ppl < unigram / 3, (engine_ppl, unigram)


def test_run_writes_english_words(text: str, capsys) -> None:
    assert cli_main(["run", "-p", "It was a", "-n", "60", "--seed", "7", "--temperature", "0.7"]) == 0
    out = capsys.readouterr().out
    words = re.findall(r"[a-z]+", out.split("[load")[0].lower())
    known = set(re.findall(r"[a-z]+", text.lower()))
    assert len(words) >= 25, out
    # Words of Moby-Dick chapters 1-3 only: English from its other sources ("Treasury") counts as unknown;
    # noise (the random toy model) scores near 0.
    assert sum(w in known for w in words) / len(words) > 0.6, out
