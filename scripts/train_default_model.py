"""Train the model ternlm ships (src/ternlm/models/default) from the corpus of scripts/build_corpus.py.

    python scripts/build_corpus.py corpus
    python scripts/train_default_model.py corpus runs/ternary             # the shipped model
    python scripts/train_default_model.py corpus runs/float --no-quant    # the full-precision control

Both runs use the same architecture, tokenizer recipe, data order, schedule and seed; they were run
side by side with one thread each on the 2-core machine (about two hours). Rerunning with the same
thread count gives the same weights. `--resume` continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ternlm.train import Schedule, TrainSettings, train

ARCH = {"dim": 256, "n_layers": 6, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 768, "max_seq_len": 512,
        "rope_theta": 10_000.0}
SETTINGS = TrainSettings(schedule=Schedule(steps=2400, lr=3e-3, warmup=100), batch_size=8, seq_len=512,
                         seed=1, arch=ARCH)
VOCAB = 4096


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path, help="the output directory of build_corpus.py")
    p.add_argument("out", type=Path)
    p.add_argument("--no-quant", action="store_true", help="train the same network with float linears")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    settings = SETTINGS
    if a.no_quant:
        settings = TrainSettings(**{**SETTINGS.__dict__, "arch": {**ARCH, "quant": False}})
    files = sorted((a.corpus / "train").glob("*.txt"))
    out = train(files, a.out, settings, vocab_size=VOCAB, val_file=a.corpus / "heldout" / "moby-dick.txt",
                resume=a.resume, threads=a.threads, checkpoint_every=100, eval_every=100)
    print(f"exported {out}")


if __name__ == "__main__":
    main()
