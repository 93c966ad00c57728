"""ternlm.evaluate and the lm-eval adapter: log-likelihoods against hand computations on the shipped model,
strided windows against a hand count on a stub model whose predictions need context."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ternlm
from ternlm import evaluate as ev
from ternlm.api import default_model_path
from ternlm.errors import FormatError, ParamError
from ternlm.sampling import log_softmax

TEXT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def model() -> ternlm.Model:
    return ternlm.load()


def hand_logprob(model: ternlm.Model, ids: list[int], first: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= first, one row at a time with sampling.log_softmax. The pass is over
    ids[:-1], as the scorer's: the engine's rows can move by ~0.05 with the input's length (int8 rounding)."""
    logits = model.logits(ids[:-1])
    return sum(float(log_softmax(logits[t - 1])[ids[t]]) for t in range(first, len(ids)))


# ---- perplexity ----------------------------------------------------------------------------------------


def test_perplexity_of_one_window_equals_a_direct_pass(model: ternlm.Model) -> None:
    ids = model.tokenizer.encode(TEXT, add_bos=True)
    r = ev.perplexity(model, TEXT, ctx=len(ids) + 5)
    assert r.windows == 1 and r.tokens == len(ids) - 1
    expected = -hand_logprob(model, ids, 1)
    assert r.nll == pytest.approx(expected, rel=1e-9)
    assert r.perplexity == pytest.approx(math.exp(expected / (len(ids) - 1)), rel=1e-7)
    assert r.tokens_per_s > 0


def test_strided_perplexity_scores_each_token_once_with_its_window_context(model: ternlm.Model) -> None:
    ids = model.tokenizer.encode(TEXT, add_bos=True)
    r = ev.perplexity(model, TEXT, ctx=32, stride=10)
    plan = ev.windows(len(ids), 32, 10)
    expected = -sum(hand_logprob(model, ids[b:e], f - b) for b, e, f in plan)
    assert r.windows == len(plan) > 1 and r.nll == pytest.approx(expected, rel=1e-9)


def test_windows_cover_every_token_once() -> None:
    for n, ctx, stride in [(100, 16, 8), (100, 16, 15), (17, 16, 1), (5, 16, 8), (64, 2, 1)]:
        plan = ev.windows(n, ctx, stride)
        scored = [t for _, e, f in plan for t in range(f, e)]
        assert scored == list(range(1, n))
        for i, (b, e, f) in enumerate(plan):
            assert e - b <= ctx and b < f
            if i and e < n:
                assert f - b == ctx - stride


class InductionModel:
    """Stub: row i puts logit 10 on token i - 1 of the same window (perfect for period-2 text), so a prediction
    is only good when the window holds the token two places back."""

    n_ctx, vocab, path = 64, 8, Path("stub")

    class tokenizer:  # a stand-in with the one method perplexity() uses
        @staticmethod
        def encode(text: str, add_bos: bool = True) -> list[int]:
            return [0] * add_bos + [1 + "ab".index(c) for c in text]

    def logits(self, tokens: list[int]) -> np.ndarray:
        out = np.zeros((len(tokens), self.vocab), dtype=np.float32)
        for i in range(1, len(tokens)):
            out[i, tokens[i - 1]] = 10.0
        return out


def test_more_context_lowers_perplexity_by_the_hand_count() -> None:
    # ids: BOS a b a b a b a b (9 ids). A window's row 0 is uniform ("flat"), row 1 predicts BOS ("wrong" for t=2),
    # later rows predict ids[t-2] ("hit" for t >= 3). ctx 4, stride 3: windows score t=1..3 (flat, wrong, hit),
    # t=4..6 from begin 3 (flat, hit, hit), t=7..8 from begin 5 (hit, hit): 5 hits, 2 flat, 1 wrong.
    # ctx 4, stride 1: t=1..3 as before, then t=4..8 each with two ids before it: 6 hits, 1 flat, 1 wrong.
    hit = -math.log(math.exp(10) / (math.exp(10) + 7))
    flat = math.log(8)
    wrong = math.log(math.exp(10) + 7)
    stub = InductionModel()
    wide = ev.perplexity(stub, "abababab", ctx=4, stride=3)
    narrow = ev.perplexity(stub, "abababab", ctx=4, stride=1)
    assert wide.nll == pytest.approx(5 * hit + 2 * flat + wrong)
    assert narrow.nll == pytest.approx(6 * hit + flat + wrong)
    assert narrow.perplexity < wide.perplexity


def test_perplexity_parameters_are_checked(model: ternlm.Model) -> None:
    with pytest.raises(ParamError):
        ev.perplexity(model, TEXT, ctx=8, stride=8)
    with pytest.raises(ParamError):
        ev.perplexity(model, TEXT, ctx=model.n_ctx + 1)
    with pytest.raises(ParamError):
        ev.perplexity(model, "")
    assert ev.perplexity(model, TEXT, max_tokens=7).tokens == 7


def test_rolling_loglikelihood_is_minus_the_nll(model: ternlm.Model) -> None:
    assert ev.rolling_loglikelihood(model, TEXT) == pytest.approx(-ev.perplexity(model, TEXT).nll, rel=1e-9)


# ---- multiple choice -----------------------------------------------------------------------------------


def test_loglikelihood_matches_a_hand_computation(model: ternlm.Model) -> None:
    context, cont = "The sky is", " blue"
    ctx_ids = model.tokenizer.encode(context, add_bos=True)
    cont_ids = model.tokenizer.encode(cont, add_bos=False)
    ll, greedy = ev.loglikelihood(model, context, cont)
    assert ll == pytest.approx(hand_logprob(model, ctx_ids + cont_ids, len(ctx_ids)), rel=1e-9)
    assert ll < 0 and isinstance(greedy, bool)
    # lm-eval's convention: the context's trailing space belongs to the continuation.
    assert ev.loglikelihood(model, "The sky is ", "blue")[0] == pytest.approx(ll, rel=1e-12)


def test_score_item_picks_by_sum_per_character_and_per_byte() -> None:
    # sums -5, -0.9, -2.5; per character -0.5, -0.9, -1.25; per UTF-8 byte ("é" is 2 bytes) -0.5, -0.45, -1.25.
    r = ev.score_item([-5.0, -0.9, -2.5], ["aaaaaaaaaa", "é", "xy"], label=0)
    assert (r.pred, r.pred_norm, r.pred_bytes) == (1, 0, 1)
    s = ev.summarize([r, ev.score_item([-1.0, -2.0], ["a", "b"], label=1)])
    assert (s.items, s.acc, s.acc_norm, s.acc_bytes) == (2, 0.0, 0.5, 0.0)


ITEMS = [
    {"context": "The sky is", "choices": ["blue", "green", "made of cheese"], "label": 0},
    {"ctx": "A cat", "endings": ["meows.", "barks."], "label": "1"},
    {"question": "2 + 2 =", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
]


def test_evaluate_choice_on_a_tiny_task(model: ternlm.Model, tmp_path: Path) -> None:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in ITEMS) + "\n\n")
    items = ev.load_task(path)
    assert [it.label for it in items] == [0, 1, 1]
    assert items[2].context == "Question: 2 + 2 =\nAnswer:"
    result = ev.evaluate_choice(model, items)
    expected = []
    for it, r in zip(items, result.results, strict=True):
        ctx_ids = model.tokenizer.encode(it.context, add_bos=True)
        lls = [hand_logprob(model, ctx_ids + model.tokenizer.encode(" " + c, add_bos=False), len(ctx_ids))
               for c in it.choices]
        assert r.loglikelihoods == pytest.approx(lls, rel=1e-9)
        expected.append(ev.score_item(lls, it.choices, it.label))
    hand = ev.summarize(expected)
    assert (result.items, result.acc, result.acc_norm) == (3, hand.acc, hand.acc_norm)
    assert len(ev.load_task(path, limit=2)) == 2


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "label"),
    ('{"context": "x", "choices": ["a"], "label": 0}', "at least two"),
    ('{"text": "x"}', "needs"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}', "answerKey"),
    ("[1, 2]", "JSON object"),
])
def test_bad_task_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    with pytest.raises(FormatError, match=f"bad.jsonl:2: .*{message}"):
        ev.load_task(path)


def test_cli_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    ev.add_arguments(sub.add_parser("eval"))
    text, task = tmp_path / "t.txt", tmp_path / "task.jsonl"
    text.write_text(TEXT)
    task.write_text("\n".join(json.dumps(x) for x in ITEMS))
    model = str(default_model_path())
    assert ev.run(parser.parse_args(["eval", "perplexity", model, str(text), "--ctx", "64", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ctx"] == 64 and out["stride"] == 32
    assert out["tokens"] == len(ternlm.load(model).tokenizer.encode(TEXT, add_bos=False))
    assert ev.run(parser.parse_args(["eval", "choice", model, str(task), "--limit", "2"])) == 0
    assert capsys.readouterr().out.startswith("items 2  acc ")


# ---- lm-evaluation-harness -----------------------------------------------------------------------------

TASK_YAML = """task: ternlm_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_adapter_runs_a_tiny_local_task(model: ternlm.Model, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval (lm-evaluation-harness) is not installed")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ternlm.lm_eval_adapter import register

    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in ITEMS[:1] * 2 + [
        {"context": "A cat", "choices": ["meows.", "barks."], "label": 1}]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(data=data))
    lm = register()(path=str(default_model_path()))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    out = simple_evaluate(model=lm, tasks=["ternlm_tiny"], task_manager=tasks, log_samples=True)
    metrics = out["results"]["ternlm_tiny"]
    ours = ev.evaluate_choice(model, ev.load_task(data))
    assert metrics["acc,none"] == pytest.approx(ours.acc)
    assert metrics["acc_norm,none"] == pytest.approx(ours.acc_norm)
    samples = sorted(out["samples"]["ternlm_tiny"], key=lambda s: s["doc_id"])
    lls = [[resp[0][0] for resp in s["resps"]] for s in samples]
    assert lls == [pytest.approx(r.loglikelihoods, rel=1e-9) for r in ours.results]
    assert lm.generate_until([type("Req", (), {"args": ("The sky", {"until": ["\n"], "max_gen_toks": 5})})()])[0] \
        is not None


def test_adapter_module_imports_without_lm_eval() -> None:
    code = "import sys, ternlm.lm_eval_adapter; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
