"""Write the small random-weight model that ternlm ships as its default (src/ternlm/models/default).

It has the BitNet b1.58 2B4T architecture and file layout (packed uint8 weights + weight_scale,
relu² FFN, sub-norms, tied embeddings) at toy size, with a byte-level tokenizer. Its weights are random:
it exercises the whole engine but writes noise. Needs numpy, safetensors and tokenizers.

    python scripts/make_default_model.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from ternlm import ternary
from ternlm.formats.hf import pack_hf

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CONFIG = {
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
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", 256)])
    return tok


def main(out: Path) -> None:
    rng = np.random.default_rng(1234)
    c = CONFIG
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
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
        "model_max_length": c["max_position_embeddings"],
    }, indent=2) + "\n")
    (out / "README.md").write_text(
        "# ternlm default model (random weights)\n\n"
        "A toy BitNet b1.58 model (4 layers, width 256, byte-level tokenizer) with **random ternary weights**,\n"
        "written by `scripts/make_default_model.py`. It runs the whole engine but its text is noise.\n"
        "For a real model: `huggingface-cli download microsoft/bitnet-b1.58-2B-4T --local-dir bitnet-2b`,\n"
        "then `ternlm run bitnet-2b`.\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "src/ternlm/models/default")
