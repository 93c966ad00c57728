"""Write tiny random BitNet / ternary-Llama checkpoints in the published Hugging Face layouts.

Packing uses transformers' own `pack_weights`, so ternlm's unpacking is checked against an
independent implementation rather than against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

# Layout name -> (quantization_config, linear weight storage).
LAYOUTS = {
    # microsoft/bitnet-b1.58-2B-4T: packed uint8, weight_scale = mean|W| multiplied in.
    "packed_autobitlinear": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                             "quantization_mode": "offline"},
    # HF1BitLLM / Falcon3-1.58bit: packed uint8, weight_scale = 1/mean|W| divided out.
    "packed_bitlinear": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
    # bitnet-b1.58-2B-4T-bf16 / 1bitLLM: latent bf16 weights, ternarized at load (transformers: online mode).
    "latent_bf16": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
}

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str = "bitnet", vocab: int = 300, dim: int = 128, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, ffn: int = 320, max_pos: int = 256, tied: bool | None = None) -> dict:
    """A config.json dict for a tiny model of the given architecture ("bitnet" or "llama")."""
    common = {
        "vocab_size": vocab, "hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False,
    }
    if arch == "bitnet":
        return {**common, "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
                "tie_word_embeddings": True if tied is None else tied}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "tie_word_embeddings": False if tied is None else tied}


def write_checkpoint(path: Path, config: dict, layout: str, seed: int = 0, shards: int = 1) -> Path:
    """Write config.json and safetensors for a random model in `layout` (a key of LAYOUTS)."""
    import torch
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    gen = torch.Generator().manual_seed(seed)
    dim, ffn, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = dim // heads
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (dim, dim), "k_proj": (kv, dim), "v_proj": (kv, dim), "o_proj": (dim, dim),
              "gate_proj": (ffn, dim), "up_proj": (ffn, dim), "down_proj": (dim, ffn)}

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:  # near 1, like trained norms, but not exactly
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(config["vocab_size"], dim),
                                        "model.norm.weight": norm(dim)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = randn(config["vocab_size"], dim, std=0.5)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm(dim)
        tensors[p + "post_attention_layernorm.weight"] = norm(dim)
        if config["model_type"] == "bitnet":
            tensors[p + "self_attn.attn_sub_norm.weight"] = norm(dim)
            tensors[p + "mlp.ffn_sub_norm.weight"] = norm(ffn)
        for name in LINEAR_NAMES:
            module = ("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + name
            latent = randn(*shapes[name], std=0.05)
            if layout == "latent_bf16":
                tensors[p + module + ".weight"] = latent
                continue
            mean = latent.float().abs().mean().clamp(min=1e-5)
            ternary = (latent.float() / mean).round().clamp(-1, 1)
            tensors[p + module + ".weight"] = pack_weights(ternary.clone())
            stored = mean if layout == "packed_autobitlinear" else 1.0 / mean
            tensors[p + module + ".weight_scale"] = stored.reshape(1).to(torch.bfloat16)

    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    full = {**config, "quantization_config": LAYOUTS[layout], "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(full, indent=2))
    return path


def hf_logits(path: Path, tokens: list[int]):
    """Logits from Hugging Face transformers for `tokens`, in float32, as a numpy array."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    for param in model.parameters():  # AutoBitLinear keeps its unpacked weight in the checkpoint dtype
        if param.dtype.is_floating_point:
            param.data = param.data.float()
    for buf in model.buffers():
        if buf.dtype.is_floating_point:
            buf.data = buf.data.float()
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    return out.logits[0].float().numpy()
