"""ternlm's forward pass against Hugging Face transformers on tiny random checkpoints in every layout.

Why these tolerances: both sides quantize activations to int8 per token, so a 1e-7 relative difference
in float arithmetic (summation order, exp, rsqrt) can move one activation across a rounding boundary and
change that layer's output by a whole quantization step. Comparing with a max-difference alone would be
either flaky or meaninglessly loose. We therefore check
- per position, the mean absolute logit difference relative to the logits' spread. Without a flip it
  is ~2e-7; a flipped rounding moves its own position by up to ~1e-2 and every later position (they
  attend to its keys) by ~1e-4. So: median over positions < 1e-3, mean < 1e-2, max < 0.1. A real bug
  (a wrong scale, row order or RoPE layout) moves the positions it touches by ~1.
- that the argmax agrees at >= 95 % of positions,
- and, where no rounding is involved, exact integer equality (packing, accumulators).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ternlm
from ternlm import kernels
from tiny_models import LAYOUTS, hf_logits, tiny_config, write_checkpoint

torch = pytest.importorskip("torch", reason="the transformers oracle needs torch==2.13.0")
pytest.importorskip("transformers")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' bitnet code is torch.compile'd: 60 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.oracle

CASES = [("bitnet", layout) for layout in LAYOUTS] + [("llama", "packed_bitlinear"), ("llama", "latent_bf16")]


def check_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape
    per_position = np.mean(np.abs(ours - ref), axis=-1) / np.std(ref)
    top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    summary = (f"{what}: relative diff median {np.median(per_position):.1e}, mean {per_position.mean():.1e}, "
               f"max {per_position.max():.1e}, top-1 agreement {top1:.0%}")
    print(summary)
    assert np.median(per_position) < 1e-3, summary
    assert per_position.mean() < 1e-2, summary
    assert per_position.max() < 0.1, summary
    assert top1 >= 0.95, summary


@pytest.mark.parametrize("arch, layout", CASES)
def test_logits_match_transformers(tmp_path: Path, arch: str, layout: str) -> None:
    path = write_checkpoint(tmp_path / "m", tiny_config(arch), layout, seed=7)
    tokens = list(np.random.default_rng(1).integers(0, 300, 96))
    ours = ternlm.load(path, head="float").logits(tokens)
    assert ours.shape == (96, 300)
    check_close(ours, hf_logits(path, tokens), f"{arch}/{layout}")


def test_untied_bitnet_and_sharded_checkpoint(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m", tiny_config("bitnet", tied=False), "packed_autobitlinear",
                            seed=3, shards=3)
    tokens = list(range(1, 60))
    model = ternlm.load(path, head="float")
    assert model.weights.head is not model.weights.embed
    check_close(model.logits(tokens), hf_logits(path, tokens), "untied, 3 shards")


def test_incremental_decode_equals_full_forward(tmp_path: Path) -> None:
    """The KV cache path (one token at a time) reproduces the full-sequence logits."""
    path = write_checkpoint(tmp_path / "m", tiny_config("bitnet"), "packed_autobitlinear", seed=5)
    model = ternlm.load(path, head="float")
    tokens = list(np.random.default_rng(2).integers(0, 300, 40))
    full = model.logits(tokens)
    steps = np.stack([model._step([t], i) for i, t in enumerate(tokens)])
    # Activations are quantized per token, so a token's logits do not depend on its batch neighbours.
    np.testing.assert_allclose(steps, full, rtol=1e-4, atol=1e-4 * float(np.std(full)))


def test_integer_accumulators_equal_torch(tmp_path: Path) -> None:
    """Loaded weights times int8 activations give exactly torch's integer product of the HF weights."""
    from safetensors.torch import load_file
    from transformers.integrations.bitnet import unpack_weights

    path = write_checkpoint(tmp_path / "m", tiny_config("bitnet"), "packed_bitlinear", seed=9)
    model = ternlm.load(path, head="float")
    packed = load_file(str(path / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    w = unpack_weights(packed, torch.float32)
    x = np.random.default_rng(0).standard_normal((5, w.shape[1])).astype(np.float32)
    xq, _, sums = kernels.quantize_activations(x)
    ours = kernels.ternary_matmul_i32(model.weights.layers[1].down.packed, xq, sums)
    ref = (torch.from_numpy(xq[:, :w.shape[1]].astype(np.float64)) @ w.double().T).numpy()
    np.testing.assert_array_equal(ours, ref.astype(np.int64))


def test_1bitllm_naming_and_silu(tmp_path: Path) -> None:
    """1bitLLM/bitnet_b1_58-*: BitnetForCausalLM, SiLU FFN, sub-norms named inner_attn_ln / ffn_layernorm."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = {**tiny_config("bitnet"), "hidden_act": "silu"}
    path = write_checkpoint(tmp_path / "m", cfg, "latent_bf16", seed=11)
    tokens = list(range(3, 70))
    ours = ternlm.load(path, head="float").logits(tokens)
    check_close(ours, hf_logits(path, tokens), "bitnet/silu")

    renamed = {k.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
               .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm"): v
               for k, v in load_file(str(path / "model.safetensors")).items()}
    save_file(renamed, str(path / "model.safetensors"))
    raw = json.loads((path / "config.json").read_text())
    raw.update(architectures=["BitnetForCausalLM"], model_type="llama")
    del raw["quantization_config"]
    (path / "config.json").write_text(json.dumps(raw))
    np.testing.assert_array_equal(ternlm.load(path, head="float").logits(tokens), ours)
