"""`ternlm train`: quantization-aware training of a BitNet b1.58 model from text files, on CPU or GPU.

A byte-level BPE tokenizer is trained on the corpus, the corpus is encoded once (each file one document,
BOS before and EOS after it), and the model trains on random windows drawn from a generator seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would. AdamW follows the
two-stage schedule of BitNet b1.58 2B4T: a high peak learning rate with cosine decay, then an abrupt
cool-down with weight decay switched off. The result is exported as a Hugging Face BitNet directory
that `ternlm.load` (and transformers) read, and as a `.tlm` file.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ternlm.errors import FormatError, ParamError

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class ArchConfig:
    """The model's shape; the same numbers go into the exported config.json."""

    vocab_size: int
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 768
    max_seq_len: int = 512
    rope_theta: float = 10_000.0
    quant: bool = True  # False: the same network with plain float linears (the full-precision control)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class Schedule:
    """Learning rate and weight decay per optimizer step."""

    steps: int
    lr: float = 3e-3  # peak
    warmup: int = 200
    stage2_at: float = 0.6  # fraction of the run where the cool-down begins
    stage1_end: float = 0.4  # stage 1 decays (cosine) from lr to lr * stage1_end
    stage2_start: float = 0.15  # stage 2 drops to lr * stage2_start, then decays (cosine) to 0
    weight_decay: float = 0.1  # stage 1 only; 0 in stage 2

    def at(self, step: int) -> tuple[float, float]:
        """(learning rate, weight decay) for optimizer step `step` (0-based)."""
        s2 = int(self.steps * self.stage2_at)
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup, self.weight_decay
        if step < s2:
            frac = (step - self.warmup) / max(1, s2 - self.warmup)
            lo = self.lr * self.stage1_end
            return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac)), self.weight_decay
        frac = (step - s2) / max(1, self.steps - s2)
        return self.lr * self.stage2_start * 0.5 * (1 + math.cos(math.pi * frac)), 0.0


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; saved in the checkpoint so a resume cannot drift."""

    schedule: Schedule
    batch_size: int = 8
    seq_len: int = 512
    accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    grad_clip: float = 1.0
    arch: dict = field(default_factory=dict)  # ArchConfig fields other than vocab_size
    distill_weight: float = 0.0  # with a teacher: loss = (1 - w) * cross-entropy + w * KL(teacher || student)
    distill_temperature: float = 1.0


# ---- tokenizer and corpus -------------------------------------------------------------------------------


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{f}: cannot read as UTF-8 text ({e})") from e
    if not any(t.strip() for t in texts):
        raise ParamError("the training files hold no text")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE on `texts` and write tokenizer.json + tokenizer_config.json into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIALS) + 1:
        raise ParamError(f"vocab_size {vocab_size} leaves no room for merges beyond the 256 bytes")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A $B",
                                                       special_tokens=[(SPECIALS[0], bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "add_bos_token": True, "model_max_length": 2048,
    }, indent=2) + "\n")


def special_ids(tokenizer_dir: Path) -> tuple[int, list[int]]:
    """(BOS id, EOS ids) of a tokenizer written by train_tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = [tok.token_to_id(s) for s in SPECIALS]
    if None in ids:
        raise FormatError(f"{tokenizer_dir}/tokenizer.json lacks one of the special tokens {SPECIALS}")
    return ids[0], ids[1:]


def encode_corpus(texts: list[str], tokenizer_dir: Path) -> np.ndarray:
    """All texts as one id stream, each as BOS text EOS (<|end_of_text|>)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    bos, (eos, _) = special_ids(tokenizer_dir)
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([bos, *enc.ids, eos], dtype=np.int32))
    return np.concatenate(parts)


def batch(data: np.ndarray, settings: TrainSettings, step: int, micro: int) -> np.ndarray:
    """Windows (batch_size, seq_len + 1) for one micro-batch; a pure function of (seed, step, micro)."""
    n = settings.seq_len + 1
    if len(data) <= n:
        raise ParamError(f"the corpus has {len(data)} tokens, fewer than one window of {n}")
    rng = np.random.default_rng([settings.seed, step, micro])
    starts = rng.integers(0, len(data) - n, size=settings.batch_size)
    return np.stack([data[s:s + n] for s in starts])


# ---- training loop --------------------------------------------------------------------------------------


def _param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    return [{"params": decay, "decay": True}, {"params": rest, "decay": False, "weight_decay": 0.0}]


def distill_loss(model, teacher, ids, weight: float, temperature: float):
    """(1 - weight) × next-token cross-entropy + weight × T² × KL(teacher ‖ student) of the softened
    distributions, per predicted token; the teacher must share the student's tokenizer."""
    import torch
    import torch.nn.functional as F

    logits = model(ids[:, :-1]).flatten(0, 1).float()
    ce = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    with torch.no_grad():
        target = F.log_softmax(teacher(ids[:, :-1]).flatten(0, 1).float() / temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1), target, log_target=True, reduction="batchmean")
    return (1 - weight) * ce + weight * temperature ** 2 * kl


def evaluate_loss(model, data: np.ndarray, seq_len: int, windows: int = 16) -> float:
    """Mean loss over `windows` evenly spaced windows of held-out ids (the same ones every time)."""
    import torch

    n = seq_len + 1
    starts = np.linspace(0, len(data) - n, windows).astype(np.int64)
    ids = torch.from_numpy(np.stack([data[s:s + n] for s in starts]).astype(np.int64))
    model.eval()
    with torch.no_grad():
        loss = model.loss(ids).item()
    model.train()
    return loss


def train(files: list[Path], out: Path, settings: TrainSettings, *, vocab_size: int = 4096,
          val_file: Path | None = None, init: Path | None = None, resume: bool = False,
          checkpoint_every: int = 200, eval_every: int = 200, threads: int | None = None,
          device: str = "cpu", progress: bool = True, stop_at: int | None = None,
          teacher: Path | None = None) -> Path:
    """Train (or resume, or fine-tune from `init`) and export; returns the exported model directory.

    `stop_at` ends this invocation after that step (checkpointed and exported); `resume` goes on from there.
    `teacher` (a run directory or exported model with the same tokenizer) is distilled from when
    settings.distill_weight > 0.
    """
    import torch
    from tqdm import tqdm

    from ternlm import qat

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    state = None
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False, map_location=device)
        if state["settings"] != asdict(settings):
            raise ParamError(f"{ckpt_path}: saved with other settings; resume with the same ones "
                             f"(saved: {state['settings']})")
    if settings.distill_weight > 0 and teacher is None:
        raise ParamError("distill_weight > 0 needs a teacher model")
    source = init or (teacher if settings.distill_weight > 0 else None)  # whose tokenizer the run keeps
    if source is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (source / name).is_file():
                raise FormatError(f"{source}: no {name}; --init and --teacher take a run directory or an export")
            (out / name).write_bytes((source / name).read_bytes())
    texts = read_texts(files)
    if source is None and not (out / "tokenizer.json").is_file():
        train_tokenizer(texts, vocab_size, out)
    data = encode_corpus(texts, out)
    val = encode_corpus(read_texts([val_file]), out) if val_file else None
    bos, eos_ids = special_ids(out)

    torch.manual_seed(settings.seed)
    if state is not None:  # the checkpoint's shape, whatever the model was initialised from
        arch = ArchConfig(**state["arch"])
        model = qat.BitNetLM(arch).to(device)
    elif init is not None:
        model = load_for_training(init, device)
        arch = model.cfg
    else:
        from tokenizers import Tokenizer

        n_vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
        arch = ArchConfig(vocab_size=n_vocab, **settings.arch)
        model = qat.BitNetLM(arch).to(device)
    teacher_model = None
    if settings.distill_weight > 0:
        teacher_model = load_for_training(teacher, device).eval()
        if teacher_model.cfg.vocab_size != arch.vocab_size:
            raise ParamError(f"teacher {teacher} has {teacher_model.cfg.vocab_size} ids, the student "
                             f"{arch.vocab_size}: distillation needs the same tokenizer")
    opt = torch.optim.AdamW(_param_groups(model), lr=settings.schedule.lr, betas=(0.9, 0.95), eps=1e-8)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "settings": asdict(settings), "arch": asdict(arch)}, tmp)
        os.replace(tmp, ckpt_path)

    tokens_per_step = settings.batch_size * settings.seq_len * settings.accum
    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=settings.schedule.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    t0, done0 = time.perf_counter(), step
    model.train()
    last = min(settings.schedule.steps, stop_at or settings.schedule.steps)
    while step < last:
        lr, wd = settings.schedule.at(step)
        for g in opt.param_groups:
            g["lr"] = lr
            g["weight_decay"] = wd if g["decay"] else 0.0
        total = 0.0
        for micro in range(settings.accum):
            ids = torch.from_numpy(batch(data, settings, step, micro).astype(np.int64)).to(device)
            loss = (model.loss(ids) if teacher_model is None else
                    distill_loss(model, teacher_model, ids, settings.distill_weight, settings.distill_temperature))
            loss = loss / settings.accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        rate = (step - done0) * tokens_per_step / (time.perf_counter() - t0)
        record = {"step": step, "loss": round(total, 5), "lr": lr, "tok_s": round(rate, 1)}
        if val is not None and (step % eval_every == 0 or step == settings.schedule.steps):
            record["val_loss"] = round(evaluate_loss(model, val, settings.seq_len), 5)
        log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:.0f}", **({"val": record["val_loss"]}
                                                                     if "val_loss" in record else {}))
        bar.update(1)
        if step % checkpoint_every == 0 or step == last:
            log.flush()
            save()
    bar.close()
    log.close()
    exported = qat.export(model.cpu(), out / "model", out, bos, eos_ids)
    if arch.quant:  # the same model as one memory-mapped file in the kernels' layout
        from ternlm.formats.native import convert_native

        convert_native(exported, out / "model.tlm")
    return exported


def load_for_training(path: Path, device: str = "cpu"):
    """A qat.BitNetLM from a training directory (its checkpoint: latent weights) or an exported model
    directory (ternary weights × scale become the latent weights, so training continues from them)."""
    import torch
    from safetensors.numpy import load_file

    from ternlm import qat
    from ternlm.formats.hf import unpack_hf

    ckpt = path / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        model = qat.BitNetLM(ArchConfig(**state["arch"])).to(device)
        model.load_state_dict(state["model"])
        return model
    raw = json.loads((path / "config.json").read_text())
    fields = raw.get("ternlm_training")
    if not fields:
        raise FormatError(f"{path}/config.json: not a model exported by ternlm train (no ternlm_training key)")
    model = qat.BitNetLM(ArchConfig(**fields)).to(device)
    tensors = load_file(str(path / "model.safetensors"))
    sd = {}
    for name, t in tensors.items():
        key = name.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")
        if name.endswith("_scale"):
            continue
        if t.dtype == np.uint8:
            # Latent weights that ternarize back to exactly these codes and this scale: codes × scale / p,
            # p the share of non-zero codes, has absmean `scale`, and |codes| / p rounds to 1 for p > 2/3.
            rows = model.state_dict()[key].shape[0]
            codes = unpack_hf(t, rows).astype(np.float32) - 1
            p = max(float(np.abs(codes).mean()), 1e-6)
            t = codes * (tensors[name + "_scale"][0] / p)
        sd[key] = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
    model.load_state_dict(sd)
    return model


# ---- command line ---------------------------------------------------------------------------------------


def text_files(paths: list[Path]) -> list[Path]:
    """The files named, and the *.txt files under each directory named, in a stable order."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(p.rglob("*.txt")))
        elif p.is_file():
            out.append(p)
        else:
            raise ParamError(f"{p}: no such file or directory")
    if not out:
        raise ParamError("no training text: name .txt files or directories holding them")
    return out


def add_arguments(p) -> None:
    p.add_argument("text", nargs="+", type=Path, help="training text: UTF-8 files, or directories of *.txt "
                                                      "(each file is one document)")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="run directory: tokenizer, checkpoint.pt, log.jsonl, and the exported model in OUT/model")
    g = p.add_argument_group("model (ignored with --init, which keeps the model's own)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the text (default 4096)")
    a = asdict(ArchConfig(vocab_size=0))
    g.add_argument("--dim", type=int, default=a["dim"], help="hidden size (default %(default)s)")
    g.add_argument("--layers", type=int, default=a["n_layers"], help="transformer blocks (default %(default)s)")
    g.add_argument("--heads", type=int, default=a["n_heads"], help="attention heads (default %(default)s)")
    g.add_argument("--kv-heads", type=int, default=a["n_kv_heads"],
                   help="key/value heads, for grouped-query attention (default %(default)s)")
    g.add_argument("--ffn", type=int, default=a["ffn_dim"], help="FFN width (default %(default)s)")
    g.add_argument("--ctx", type=int, default=a["max_seq_len"],
                   help="longest context the model will run (default %(default)s)")
    g.add_argument("--rope-theta", type=float, default=a["rope_theta"], help="RoPE base (default %(default)s)")
    g.add_argument("--no-quant", action="store_true",
                   help="train the same network in full precision (float linears): the control for comparisons")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    g.add_argument("--batch-size", type=int, default=TrainSettings.batch_size,
                   help="sequences per micro-batch (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=TrainSettings.seq_len,
                   help="tokens per training sequence (default %(default)s)")
    g.add_argument("--accum", type=int, default=1, help="micro-batches per step, gradient accumulation (default 1)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    g.add_argument("--stage2-at", type=float, default=0.6,
                   help="fraction of the run where the cool-down stage starts (default 0.6)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay in stage 1 (default 0.1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialization and data order (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--val", type=Path, help="held-out text whose loss is logged every --eval-every steps")
    g.add_argument("--init", type=Path,
                   help="fine-tune: start from this run directory or exported model (its tokenizer and shape)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    g.add_argument("--teacher", type=Path,
                   help="distil from this model (a run directory or export, whose tokenizer is kept), e.g. a "
                        "--no-quant run")
    g.add_argument("--distill-weight", type=float, default=0.5,
                   help="with --teacher: weight of the KL term against cross-entropy (default 0.5)")
    g.add_argument("--distill-temperature", type=float, default=1.0, help="with --teacher: softening (default 1)")
    g.add_argument("--stop-at", type=int, help="stop (checkpointed and exported) after this step; --resume goes on")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    g.add_argument("--eval-every", type=int, default=200, help="steps between held-out losses (default 200)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from_args(args) -> TrainSettings:
    arch = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
            "ffn_dim": args.ffn, "max_seq_len": args.ctx, "rope_theta": args.rope_theta,
            "quant": not args.no_quant}
    if args.seq_len > args.ctx:
        raise ParamError(f"--seq-len {args.seq_len} exceeds --ctx {args.ctx}")
    schedule = Schedule(steps=args.steps, lr=args.lr, warmup=args.warmup, stage2_at=args.stage2_at,
                        weight_decay=args.weight_decay)
    return TrainSettings(schedule=schedule, batch_size=args.batch_size, seq_len=args.seq_len, accum=args.accum,
                         seed=args.seed, arch=arch, distill_weight=args.distill_weight if args.teacher else 0.0,
                         distill_temperature=args.distill_temperature)


def run(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ParamError("ternlm train needs PyTorch: pip install 'ternlm[train]'") from None
    out = train(text_files(args.text), args.out, settings_from_args(args), vocab_size=args.vocab_size,
                val_file=args.val, init=args.init, resume=args.resume, checkpoint_every=args.checkpoint_every,
                eval_every=args.eval_every, threads=args.threads, device=args.device, progress=not args.quiet,
                stop_at=args.stop_at, teacher=args.teacher)
    print(f"model: {out}  (ternlm run {out})")
    return 0
