"""Write tiny random BitNet / ternary-Llama checkpoints in the published Hugging Face layouts, and the toy
random model the infrastructure tests run.

Packing uses transformers' own `pack_weights`, so ternlm's unpacking is checked against an
independent implementation rather than against itself.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from ternlm import ternary
from ternlm.formats.hf import pack_hf

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


# ---- the toy model ----------------------------------------------------------------------------------

TOY_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
TOY_CONFIG = {
    "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
    "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 256, "eos_token_id": [257, 258],
    "torch_dtype": "float16",
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                            "quantization_mode": "offline"},
}


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: the 256 byte symbols as ids 0..255, then the special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet, key=lambda s: ord(s)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TOY_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", 256)])
    return tok


def write_toy_model(out: Path) -> Path:
    """The toy random-weight BitNet (4 layers, width 256, 320 embedding rows for a 259-id byte-level
    tokenizer, F16 embedding, 2048 context) that infrastructure tests run: its outputs are noise, but it
    has padding rows, exact F16 round trips and a long context."""
    rng = np.random.default_rng(1234)
    c = TOY_CONFIG
    dim, ffn, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    kv_dim = kv * dim // heads
    shapes = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv_dim, dim), "self_attn.v_proj": (kv_dim, dim),
              "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim),
              "mlp.down_proj": (dim, ffn)}
    tensors = {"model.embed_tokens.weight": (0.1 * rng.standard_normal((c["vocab_size"], dim))).astype(np.float16),
               "model.norm.weight": np.ones(dim, np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm"):
            tensors[p + name + ".weight"] = np.ones(dim, np.float32)
        tensors[p + "mlp.ffn_sub_norm.weight"] = np.ones(ffn, np.float32)
        for name, shape in shapes.items():
            w, scale = ternary.ternarize(rng.standard_normal(shape).astype(np.float32) * 0.05)
            tensors[p + name + ".weight"] = pack_hf((w + 1).astype(np.uint8))
            tensors[p + name + ".weight_scale"] = np.array([scale], np.float32)

    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
        "model_max_length": c["max_position_embeddings"],
    }, indent=2) + "\n")
    return out


@functools.cache
def toy_model_path() -> Path:
    """The toy model, written once per test process into a temporary directory."""
    return write_toy_model(Path(tempfile.mkdtemp(prefix="ternlm-toy-")) / "default")  # served as model "default"
