"""The held-out figures of the shipped model's card: perplexity on Moby-Dick (never trained on) by the
engine and by the PyTorch training code, against the full-precision control, post-training ternarization
of that control, and a unigram baseline on the same tokenizer.

    python scripts/evaluate_default_model.py corpus runs/ternary runs/float [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import ternlm
from ternlm import evaluate, qat
from ternlm.train import encode_corpus, load_for_training, read_texts, text_files

CTX, STRIDE = 512, 256


def unigram_perplexity(train_ids, heldout_ids) -> float:
    """Perplexity of held-out ids under add-one-smoothed token frequencies of the training ids."""
    counts = Counter(int(i) for i in train_ids)
    vocab = max(max(counts), max(heldout_ids)) + 1
    total = sum(counts.values()) + vocab
    nll = -sum(math.log((counts.get(i, 0) + 1) / total) for i in heldout_ids)
    return math.exp(nll / len(heldout_ids))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path)
    p.add_argument("ternary_run", type=Path)
    p.add_argument("float_run", type=Path)
    p.add_argument("--max-tokens", type=int, help="score only the first N held-out tokens (default: all)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    text = (a.corpus / "heldout" / "moby-dick.txt").read_text(encoding="utf-8")
    export = a.ternary_run / "model"
    rows: dict[str, float] = {}

    def ppl(model) -> float:
        r = evaluate.perplexity(model, text, ctx=CTX, stride=STRIDE, max_tokens=a.max_tokens)
        rows.setdefault("tokens", r.tokens)
        return r.perplexity

    for head in ("q8_0", "float"):
        rows[f"ternlm engine, {head} head"] = ppl(ternlm.load(export, head=head, cache=False))
    tok = ternlm.load(export, cache=False).tokenizer
    rows["PyTorch training code, same checkpoint"] = ppl(qat.Scorer(load_for_training(a.ternary_run), tok, export))
    rows["full-precision control (PyTorch)"] = ppl(qat.Scorer(load_for_training(a.float_run), tok, export))
    rows["control ternarized after training (engine)"] = ppl(ternlm.load(a.float_run / "model", cache=False))
    train_ids = encode_corpus(read_texts(text_files([a.corpus / "train"])), a.ternary_run)
    held = tok.encode(text, add_bos=True)[1:][:a.max_tokens]
    rows["unigram baseline, same tokenizer"] = unigram_perplexity(train_ids, held)
    engine, torch_ppl = rows["ternlm engine, q8_0 head"], rows["PyTorch training code, same checkpoint"]
    rows["engine / PyTorch - 1 (q8_0 head)"] = engine / torch_ppl - 1
    rows["engine / PyTorch - 1 (float head)"] = rows["ternlm engine, float head"] / torch_ppl - 1
    for k, v in rows.items():
        print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
