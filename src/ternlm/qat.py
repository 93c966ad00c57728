"""BitNet b1.58 in PyTorch for quantization-aware training, and its export to a checkpoint ternlm loads.

The forward pass has the inference engine's numerics: per-tensor absmean ternary weights and per-token
absmax int8 activations (scale 127 / max(|x|, 1e-5), round half to even), with straight-through
gradients to the latent float weights. So the perplexity PyTorch measures on a checkpoint is the one
the engine measures on its export. Needs the `train` extra (torch); nothing here is on the inference path.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ternlm.train import ArchConfig

EPS = 1e-5  # the quantizers' floor on absmax / absmean, as in BitNet and the engine
NORM_EPS = 1e-5


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantization; the gradient passes straight through."""
    scale = 127.0 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    q = (x * scale).round().clamp(-128, 127) / scale
    return x + (q - x).detach()


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean ternarization: codes in {-1, 0, 1} and the multiplier w_scale = 1 / s."""
    s = 1.0 / w.detach().abs().mean().clamp(min=EPS)
    return (w.detach() * s).round().clamp(-1, 1), 1.0 / s


class BitLinear(nn.Linear):
    """A bias-free linear layer whose forward pass sees ternary weights and int8 activations."""

    def __init__(self, in_features: int, out_features: int, quant: bool = True) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant:
            return F.linear(x, self.weight)
        codes, w_scale = ternarize(self.weight)
        w = self.weight + (codes * w_scale - self.weight).detach()
        return F.linear(quantize_activations(x), w)


def rope_tables(cfg: ArchConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (length, head_dim/2) computed in float32 exactly as the engine computes them."""
    exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)
    angles = np.outer(np.arange(length, dtype=np.float32), inv_freq)
    return torch.from_numpy(np.cos(angles)), torch.from_numpy(np.sin(angles))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (batch, heads, t, head_dim), rotate-half layout
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        self.q_proj = BitLinear(cfg.dim, cfg.dim, cfg.quant)
        self.k_proj = BitLinear(cfg.dim, kv_dim, cfg.quant)
        self.v_proj = BitLinear(cfg.dim, kv_dim, cfg.quant)
        self.attn_sub_norm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        self.o_proj = BitLinear(cfg.dim, cfg.dim, cfg.quant)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        self.gate_proj = BitLinear(cfg.dim, cfg.ffn_dim, cfg.quant)
        self.up_proj = BitLinear(cfg.dim, cfg.ffn_dim, cfg.quant)
        self.ffn_sub_norm = nn.RMSNorm(cfg.ffn_dim, eps=NORM_EPS)
        self.down_proj = BitLinear(cfg.ffn_dim, cfg.dim, cfg.quant)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(self.attn_sub_norm(a.transpose(1, 2).reshape(b, t, c.dim)))
        h = self.post_attention_layernorm(x)
        z = F.relu(self.gate_proj(h)).square() * self.up_proj(h)
        return x + self.down_proj(self.ffn_sub_norm(z))


class BitNetLM(nn.Module):
    """BitNet b1.58 (2B4T's design: relu² gate, sub-norms, RoPE, GQA, tied embeddings) at any size."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=NORM_EPS)
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, t, vocab) for ids (batch, t) at positions 0..t-1."""
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed_tokens.weight)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over ids (batch, t+1)."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NORMS = {"input_layernorm": "", "post_attention_layernorm": "", "attn_sub_norm": "self_attn.",
         "ffn_sub_norm": "mlp."}


def hf_config(cfg: ArchConfig, bos_id: int, eos_ids: list[int]) -> dict:
    """config.json of the export: transformers' BitNetConfig keys, 2B4T's packed-weights convention."""
    raw = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": NORM_EPS,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": True, "bos_token_id": bos_id,
        "eos_token_id": eos_ids, "torch_dtype": "float32",
        "ternlm_training": asdict(cfg),
    }
    if cfg.quant:
        raw["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "offline"}
    return raw


def export_tensors(model: BitNetLM) -> dict[str, np.ndarray]:
    """The checkpoint tensors in Hugging Face names: ternary linears packed as 2B4T packs them (uint8
    codes + a float32 weight_scale that multiplies), everything else float32.

    A full-precision model (quant=False) is exported as its float weights, for comparison only: the
    engine would ternarize them on load, which is not the model that was trained.
    """
    from ternlm.formats.hf import pack_hf

    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": model.embed_tokens.weight.detach().float().numpy(),
        "model.norm.weight": model.norm.weight.detach().float().numpy(),
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for name, sub in NORMS.items():
            out[p + sub + name + ".weight"] = getattr(layer, name).weight.detach().float().numpy()
        for name, sub in LINEARS.items():
            w = getattr(layer, name).weight.detach().float()
            key = f"{p}{sub}.{name}.weight"
            if not model.cfg.quant:
                out[key] = w.numpy()
                continue
            codes, w_scale = ternarize(w)
            out[key] = pack_hf((codes + 1).to(torch.uint8).numpy())
            out[key + "_scale"] = np.array([w_scale.item()], np.float32)
    return out


def export(model: BitNetLM, out: Path, tokenizer_dir: Path, bos_id: int, eos_ids: list[int]) -> Path:
    """Write a Hugging Face BitNet directory (config.json, model.safetensors, tokenizer files) to `out`."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(export_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, bos_id, eos_ids), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


class Scorer:
    """A training model behind the interface of `ternlm.evaluate` (logits, tokenizer, n_ctx, path), so the
    PyTorch numerics and the engine's are scored by the same windows on the same tokens."""

    def __init__(self, model: BitNetLM, tokenizer, path: Path) -> None:
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        self.n_ctx = model.cfg.max_seq_len
        self.stop_ids: set[int] = set()

    def logits(self, ids) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.tensor([list(ids)], device=self.model.embed_tokens.weight.device))[0].cpu().numpy()
