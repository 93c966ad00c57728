"""Evaluation: strided perplexity over a text file and multiple-choice tasks scored by log-likelihood, the way
lm-evaluation-harness scores them, so numbers from `ternlm eval` and the lm-eval adapter agree."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ternlm.errors import FormatError, ParamError

# Default perplexity window: the model's context, but no more, so a 128k-context model is not run on 128k windows.
MAX_DEFAULT_CTX = 1024


@dataclass
class PerplexityResult:
    """Totals of a perplexity run; `nll` is the sum over scored tokens, in nats."""

    tokens: int
    nll: float
    mean_nll: float
    perplexity: float
    seconds: float
    tokens_per_s: float
    ctx: int
    stride: int
    windows: int


@dataclass
class ChoiceItem:
    """One multiple-choice question: each choice is scored as `context + delimiter + choice`."""

    context: str
    choices: list[str]
    label: int


@dataclass
class ItemResult:
    """Scores of one item: log-likelihood of each choice, and the choices picked by acc, acc_norm and acc_bytes."""

    label: int
    loglikelihoods: list[float]
    pred: int
    pred_norm: int
    pred_bytes: int


@dataclass
class ChoiceResult:
    """Accuracy over a task: acc (raw sum), acc_norm (sum per character), acc_bytes (sum per UTF-8 byte)."""

    items: int
    acc: float
    acc_norm: float
    acc_bytes: float
    seconds: float
    results: list[ItemResult] = field(default_factory=list)


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Float64 log-probabilities of (n, vocab) logits, max-shifted so large logits cannot overflow."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def token_logprobs(model, window: Sequence[int], first: int) -> np.ndarray:
    """Log-probabilities of window[first:] given the tokens before each, from one forward pass over window[:-1]."""
    if not 1 <= first < len(window):
        raise ParamError(f"first scored position must lie in [1, {len(window)}), got {first}")
    logits = model.logits(window[:-1])[first - 1:]
    targets = np.asarray(window[first:], dtype=np.int64)
    return log_softmax_rows(logits)[np.arange(len(targets)), targets]


# ---- perplexity ----------------------------------------------------------------------------------------


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) of each window over n_tokens ids: the window is ids[begin:end] and it scores
    ids[first:end]. The first window scores all but the BOS; each later one scores the next `stride` ids with the
    ctx - stride ids before them as context (the last window keeps a full context), so each id is scored once."""
    if ctx < 2:
        raise ParamError(f"ctx must be at least 2, got {ctx}")
    if not 1 <= stride < ctx:
        raise ParamError(f"stride must lie in [1, ctx - 1] = [1, {ctx - 1}] so each token has context, got {stride}")
    out, end = [], min(ctx, n_tokens)
    out.append((0, end, 1))
    while end < n_tokens:
        prev, end = end, min(end + stride, n_tokens)
        out.append((max(0, end - ctx), end, prev))
    return out


def perplexity(model, text: str, ctx: int | None = None, stride: int | None = None,
               max_tokens: int | None = None) -> PerplexityResult:
    """Perplexity of `text` (tokenized once, with BOS) by strided sliding windows of `ctx` tokens advancing by
    `stride` (default ctx // 2); `max_tokens` scores only the first that many tokens after BOS."""
    if model.tokenizer is None:
        raise FormatError(f"{model.path}: no tokenizer.json, which perplexity needs to tokenize text")
    ctx = ctx if ctx is not None else min(model.n_ctx, MAX_DEFAULT_CTX)
    if ctx > model.n_ctx:
        raise ParamError(f"ctx {ctx} exceeds the model's context of {model.n_ctx}")
    stride = stride if stride is not None else max(1, ctx // 2)
    ids = model.tokenizer.encode(text, add_bos=True)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ParamError(f"max_tokens must be at least 1, got {max_tokens}")
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise ParamError("the text has no tokens to score (it needs at least one token after BOS)")
    plan = windows(len(ids), ctx, stride)
    start = time.perf_counter()
    nll = -sum_logprobs(model, ids, plan)
    seconds = time.perf_counter() - start
    scored = len(ids) - 1
    return PerplexityResult(tokens=scored, nll=nll, mean_nll=nll / scored, perplexity=math.exp(nll / scored),
                            seconds=seconds, tokens_per_s=scored / seconds if seconds > 0 else float("inf"),
                            ctx=ctx, stride=stride, windows=len(plan))


def sum_logprobs(model, ids: Sequence[int], plan: Sequence[tuple[int, int, int]]) -> float:
    """Sum of the log-probabilities of ids[1:] scored window by window (one forward pass each)."""
    return sum(float(token_logprobs(model, ids[b:e], f - b).sum()) for b, e, f in plan)


def rolling_loglikelihood(model, text: str) -> float:
    """Log-likelihood of all of `text` after a BOS (or EOS) token, in windows of the model's whole context that
    each predict new tokens only (lm-eval's loglikelihood_rolling); 0.0 for text with no tokens."""
    prefix, ids = encode_pair(model, "", text)
    if not ids:
        return 0.0
    seq = prefix + ids
    ctx = model.n_ctx + 1  # a window of n_ctx + 1 ids is one forward pass of n_ctx tokens
    return sum_logprobs(model, seq, windows(len(seq), ctx, ctx - 1))


# ---- log-likelihood of a continuation ------------------------------------------------------------------


def encode_pair(model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split for causal models: trailing whitespace of the context moves to the continuation, the
    whole text is encoded, and the continuation is whatever follows the context's own encoding (so a token
    merging across the boundary counts as continuation)."""
    tok = model.tokenizer
    if tok is None:
        raise FormatError(f"{model.path}: no tokenizer.json, which log-likelihood scoring needs")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tok.encode(context, add_bos=True)
    if not context_ids:
        prefix = tok.bos_id if tok.bos_id is not None else next(iter(sorted(model.stop_ids)), None)
        if prefix is None:
            raise ParamError("empty context and the model has no BOS or EOS token to condition on")
        return [prefix], tok.encode(continuation, add_bos=False)
    return context_ids, tok.encode(context + continuation, add_bos=True)[len(context_ids):]


def loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-probabilities of `continuation`'s tokens after `context`, and whether each was the argmax
    (lm-eval's (logprob, is_greedy)). A sequence longer than the context loses tokens from the left."""
    context_ids, cont_ids = encode_pair(model, context, continuation)
    if not cont_ids:
        raise ParamError(f"continuation {continuation!r} adds no tokens to the context")
    if len(cont_ids) > model.n_ctx:
        raise ParamError(f"continuation of {len(cont_ids)} tokens does not fit the context of {model.n_ctx}")
    seq = (context_ids + cont_ids)[-(model.n_ctx + 1):]
    logits = model.logits(seq[:-1])[-len(cont_ids):]
    logprobs = log_softmax_rows(logits)
    targets = np.asarray(cont_ids, dtype=np.int64)
    picked = logprobs[np.arange(len(targets)), targets]
    return float(picked.sum()), bool((logprobs.argmax(axis=-1) == targets).all())


# ---- multiple choice -----------------------------------------------------------------------------------


def parse_item(obj: object, where: str) -> ChoiceItem:
    """A ChoiceItem from one JSON object in the generic, HellaSwag or ARC shape (see docs/evaluation.md)."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "context" in obj:
        context, choices, label = obj["context"], obj.get("choices"), obj.get("label")
    elif "ctx" in obj:
        context, choices, label = obj["ctx"], obj.get("endings"), obj.get("label")
    elif "question" in obj:
        c = obj.get("choices")
        if not isinstance(c, dict) or not isinstance(c.get("text"), list) or not isinstance(c.get("label"), list):
            raise FormatError(f"{where}: ARC 'choices' must be {{\"text\": [...], \"label\": [...]}}")
        context, choices = f"Question: {obj['question']}\nAnswer:", c["text"]
        if obj.get("answerKey") not in c["label"]:
            raise FormatError(f"{where}: answerKey {obj.get('answerKey')!r} is not one of {c['label']}")
        label = c["label"].index(obj["answerKey"])
    else:
        raise FormatError(f"{where}: needs 'context'+'choices'+'label', 'ctx'+'endings'+'label' (HellaSwag) "
                          "or 'question'+'choices'+'answerKey' (ARC)")
    if not isinstance(context, str):
        raise FormatError(f"{where}: the context must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise FormatError(f"{where}: choices must be a list of at least two non-empty strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise FormatError(f"{where}: label must be an index into the {len(choices)} choices, got {label!r}")
    return ChoiceItem(context=context, choices=list(choices), label=label)


def load_task(path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """Items of a JSON-lines task file (blank lines skipped); FormatError names the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read task file: {e}") from e
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(items) >= limit:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{number}: invalid JSON: {e}") from e
        items.append(parse_item(obj, f"{path}:{number}"))
    if not items:
        raise FormatError(f"{path}: no items")
    return items


def score_item(lls: Sequence[float], choices: Sequence[str], label: int) -> ItemResult:
    """The predictions of acc (argmax of the sums), acc_norm (per character, as lm-eval) and acc_bytes."""
    ll = np.asarray(lls, dtype=np.float64)
    chars = np.array([len(c) for c in choices], dtype=np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
    return ItemResult(label=label, loglikelihoods=[float(x) for x in ll], pred=int(np.argmax(ll)),
                      pred_norm=int(np.argmax(ll / chars)), pred_bytes=int(np.argmax(ll / nbytes)))


def summarize(results: list[ItemResult], seconds: float = 0.0) -> ChoiceResult:
    """Accuracies over scored items."""
    if not results:
        raise ParamError("no items to summarize")
    n = len(results)
    return ChoiceResult(items=n, acc=sum(r.pred == r.label for r in results) / n,
                        acc_norm=sum(r.pred_norm == r.label for r in results) / n,
                        acc_bytes=sum(r.pred_bytes == r.label for r in results) / n, seconds=seconds,
                        results=results)


def evaluate_choice(model, items: Sequence[ChoiceItem], delimiter: str = " ") -> ChoiceResult:
    """Score every choice of every item as `context + delimiter + choice` (lm-eval's target_delimiter)."""
    start = time.perf_counter()
    results = [score_item([loglikelihood(model, it.context, delimiter + c)[0] for c in it.choices],
                          it.choices, it.label) for it in items]
    return summarize(results, time.perf_counter() - start)


# ---- command line --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `perplexity` and `choice` under an `eval` parser; its func is `run`."""
    sub = parser.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("perplexity", help="strided sliding-window perplexity of a text file")
    ppl.add_argument("model", help="model directory or file")
    ppl.add_argument("file", help="UTF-8 text file")
    ppl.add_argument("--ctx", type=int, default=None, help=f"window in tokens (default: min(model context, "
                                                          f"{MAX_DEFAULT_CTX}))")
    ppl.add_argument("--stride", type=int, default=None, help="tokens each window advances (default ctx // 2)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ch = sub.add_parser("choice", help="multiple-choice accuracy by log-likelihood (HellaSwag/ARC-style jsonl)")
    ch.add_argument("model", help="model directory or file")
    ch.add_argument("task", help="JSON-lines task file")
    ch.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    ch.add_argument("--json", action="store_true", help="print the result, with per-item scores, as JSON")
    for p in (ppl, ch):
        p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: physical cores)")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run `ternlm eval perplexity|choice` and print its report."""
    from ternlm import hub
    from ternlm.api import load

    if args.eval_command == "perplexity":
        path = Path(args.file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: cannot read text file: {e}") from e
        model = load(hub.resolve(args.model), threads=args.threads, n_ctx=args.ctx)
        r = perplexity(model, text, ctx=args.ctx, stride=args.stride, max_tokens=args.max_tokens)
        if args.json:
            print(json.dumps(asdict(r)))
        else:
            print(f"tokens {r.tokens}  nll {r.nll:.4f}  mean_nll {r.mean_nll:.4f}  perplexity {r.perplexity:.4f}  "
                  f"(ctx {r.ctx}, stride {r.stride}, {r.windows} windows, {r.seconds:.2f} s, "
                  f"{r.tokens_per_s:.1f} tokens/s)")
        return 0
    if args.limit is not None and args.limit < 1:
        raise ParamError(f"--limit must be at least 1, got {args.limit}")
    items = load_task(args.task, args.limit)
    model = load(hub.resolve(args.model), threads=args.threads)
    r = evaluate_choice(model, items)
    if args.json:
        print(json.dumps(asdict(r)))
    else:
        print(f"items {r.items}  acc {r.acc:.4f}  acc_norm {r.acc_norm:.4f}  acc_bytes {r.acc_bytes:.4f}  "
              f"({r.seconds:.2f} s)")
    return 0
