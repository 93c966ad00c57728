"""Quantization-aware training: the schedule, a short real run (loss falls, resume is exact, the export
loads in ternlm and in transformers with the training code's own numerics), fine-tuning and the CLI."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch (the train extra)")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' bitnet code is torch.compile'd: 60 s

import ternlm  # noqa: E402
from ternlm import evaluate, qat  # noqa: E402
from ternlm.cli import main as cli_main  # noqa: E402
from ternlm.errors import ParamError  # noqa: E402
from ternlm.train import Schedule, TrainSettings, load_for_training, train  # noqa: E402

DATA = Path(__file__).parent / "data" / "moby-dick-ch1-3.txt"
TINY = {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128, "max_seq_len": 128}


def tiny_settings(steps: int, **arch) -> TrainSettings:
    return TrainSettings(schedule=Schedule(steps=steps, lr=3e-3, warmup=5), batch_size=8, seq_len=64, seed=3,
                         arch={**TINY, **arch})


def corpus(tmp_path: Path) -> tuple[list[Path], Path]:
    """Chapters 1-2 to train on, chapter 3 held out."""
    text = DATA.read_text(encoding="utf-8")
    cut = text.index("CHAPTER 3.")
    (tmp_path / "train.txt").write_text(text[:cut], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[cut:], encoding="utf-8")
    return [tmp_path / "train.txt"], tmp_path / "val.txt"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    tmp = tmp_path_factory.mktemp("train")
    files, val = corpus(tmp)
    train(files, tmp / "run", tiny_settings(60), vocab_size=400, val_file=val, threads=1, progress=False,
          eval_every=30, checkpoint_every=30)
    return tmp / "run", files, val


def test_schedule_has_two_stages() -> None:
    s = Schedule(steps=1000, lr=1e-3, warmup=100, stage2_at=0.6, stage1_end=0.4, stage2_start=0.15,
                 weight_decay=0.1)
    lrs, wds = zip(*(s.at(i) for i in range(1000)), strict=True)
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)  # linear warm-up to the peak
    assert all(a >= b for a, b in itertools.pairwise(lrs[100:600]))  # stage 1 decays
    assert lrs[599] == pytest.approx(4e-4, rel=0.01)  # ... to lr * stage1_end
    assert lrs[600] == pytest.approx(1.5e-4)  # the abrupt cool-down
    assert lrs[-1] < 1e-6  # ... decaying to zero
    assert set(wds[:600]) == {0.1} and set(wds[600:]) == {0.0}  # weight decay off in stage 2


def test_quantizers_are_the_engines() -> None:
    from ternlm import kernels, ternary

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32) * 0.03
    codes, w_scale = qat.ternarize(torch.from_numpy(w))
    ref_codes, ref_scale = ternary.ternarize(w)
    assert np.array_equal(codes.numpy().astype(np.int8), ref_codes)
    assert w_scale.item() == pytest.approx(ref_scale, rel=1e-6)
    x = rng.standard_normal((5, 256)).astype(np.float32) * 3
    xq, a_scale, _ = kernels.quantize_activations(x, k_pad=256)
    fake = qat.quantize_activations(torch.from_numpy(x)).numpy()
    assert np.allclose(fake, xq.astype(np.float32) / a_scale[:, None], rtol=1e-6, atol=1e-7)


def test_straight_through_gradients_reach_latent_weights() -> None:
    lin = qat.BitLinear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loss_goes_down(trained) -> None:
    run, _, _ = trained
    log = losses(run)
    assert len(log) == 60
    assert np.mean(log[-10:]) < np.mean(log[:5]) - 1.0, log
    val = [json.loads(line)["val_loss"] for line in (run / "log.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert len(val) == 2 and val[1] < np.log(400)  # held-out loss below uniform over the vocabulary


def test_resume_gives_the_same_run(tmp_path, trained) -> None:
    run, files, val = trained
    half = tmp_path / "half"
    (half).mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (half / name).write_bytes((run / name).read_bytes())
    # Stop at step 30 (the checkpoint a killed run leaves), then resume to 60.
    settings = tiny_settings(60)
    train(files, half, settings, val_file=val, threads=1, progress=False, checkpoint_every=30, eval_every=30,
          stop_at=30)
    assert len(losses(half)) == 30
    train(files, half, settings, val_file=val, threads=1, progress=False, resume=True, checkpoint_every=30,
          eval_every=30)
    assert losses(half)[30:] == losses(run)[30:]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (half, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, trained) -> None:
    run, files, _ = trained
    with pytest.raises(ParamError, match="other settings"):
        train(files, run, tiny_settings(80), threads=1, progress=False, resume=True)


def test_export_runs_in_the_engine_with_training_numerics(trained) -> None:
    run, _, val = trained
    torch_model = load_for_training(run)
    engine = ternlm.load(run / "model", head="float", cache=False)
    ids = engine.tokenizer.encode(val.read_text(encoding="utf-8")[:2000], add_bos=True)[:120]
    with torch.no_grad():
        ref = torch_model.eval()(torch.tensor([ids]))[0].numpy()
    got = engine.logits(ids)
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.97
    np.testing.assert_array_equal(ternlm.load(run / "model.tlm").logits(ids),  # the .tlm: Q8_0 head
                                  ternlm.load(run / "model", cache=False).logits(ids))
    text = val.read_text(encoding="utf-8")
    pt = evaluate.perplexity(qat.Scorer(torch_model, engine.tokenizer, run), text, ctx=128, max_tokens=1500)
    for head in ("float", "q8_0"):
        ppl = evaluate.perplexity(ternlm.load(run / "model", head=head, cache=False), text, ctx=128,
                                  max_tokens=1500)
        assert ppl.tokens == pt.tokens
        assert abs(ppl.perplexity / pt.perplexity - 1) < 0.01, (head, ppl.perplexity, pt.perplexity)


@pytest.mark.oracle
def test_export_loads_in_transformers(trained) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate for a bitnet quantization_config")
    run, _, val = trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "model", torch_dtype=torch.float32).eval()
    mine = load_for_training(run).eval()
    tok = ternlm.load(run / "model", cache=False).tokenizer
    ids = torch.tensor([tok.encode(val.read_text(encoding="utf-8")[:1500], add_bos=True)[:100]])
    with torch.no_grad():
        a, b = hf(ids).logits[0], mine(ids)[0]
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97


def test_fine_tuning_starts_from_the_exported_weights(tmp_path, trained) -> None:
    run, _, val = trained
    from_export, from_run = load_for_training(run / "model").eval(), load_for_training(run).eval()
    ids = torch.randint(0, 400, (1, 64))
    with torch.no_grad():
        assert torch.allclose(from_export(ids), from_run(ids), atol=1e-4)
    # Continue training the export on new text (chapter 3): its loss on that text falls.
    out = tmp_path / "tuned"
    train([val], out, tiny_settings(20), init=run / "model", threads=1, progress=False)
    before = losses(out)[:3]
    assert np.mean(losses(out)[-3:]) < np.mean(before)
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


def test_full_precision_control_exports_float_weights(tmp_path) -> None:
    files, _ = corpus(tmp_path)
    out = train(files, tmp_path / "fp", tiny_settings(3, quant=False), vocab_size=300, threads=1, progress=False)
    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw and raw["ternlm_training"]["quant"] is False
    model = load_for_training(out)
    assert not model.cfg.quant


def test_cli_trains_and_the_model_runs(tmp_path, capsys) -> None:
    files, val = corpus(tmp_path)
    rc = cli_main(["train", str(files[0]), "-o", str(tmp_path / "cli"), "--vocab-size", "300", "--dim", "64",
                   "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "128", "--ctx", "64",
                   "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--warmup", "2", "--threads", "1",
                   "--quiet", "--val", str(val), "--eval-every", "2"])
    assert rc == 0 and "model:" in capsys.readouterr().out
    model = ternlm.load(tmp_path / "cli" / "model", cache=False)
    assert len(list(model.generate("Call me", max_tokens=5, temperature=0.0))) >= 1
    assert cli_main(["train", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_distillation_pulls_the_student_to_the_teacher(tmp_path, trained) -> None:
    run, files, _ = trained
    settings = replace(tiny_settings(25, dim=32, ffn_dim=64), distill_weight=1.0, distill_temperature=2.0)
    train(files, tmp_path / "student", settings, teacher=run, threads=1, progress=False)
    kl = losses(tmp_path / "student")  # with weight 1 the logged loss is T² · KL(teacher || student)
    assert np.mean(kl[-5:]) < 0.5 * np.mean(kl[:3]), kl
    assert (tmp_path / "student" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    with pytest.raises(ParamError, match="teacher"):
        train(files, tmp_path / "none", settings, threads=1, progress=False)
