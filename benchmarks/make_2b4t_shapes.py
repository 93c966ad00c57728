"""Write a model with the exact BitNet b1.58 2B4T shapes and random ternary weights (about 1.2 GB).

Packed Hugging Face layout like microsoft/bitnet-b1.58-2B-4T, F16 embedding/tied head (the same
657 MB per token as the published BF16 one). Speed does not depend on the weight values.

    python benchmarks/make_2b4t_shapes.py [OUTPUT_DIR]   (default bench-models/2b4t-random)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ternlm.formats.hf import pack_hf

CONFIG = {
    "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
    "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20,
    "num_key_value_heads": 5, "vocab_size": 128256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                            "quantization_mode": "offline"},
}


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    c = CONFIG
    dim, ffn = c["hidden_size"], c["intermediate_size"]
    kv_dim = c["num_key_value_heads"] * dim // c["num_attention_heads"]
    shapes = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv_dim, dim), "self_attn.v_proj": (kv_dim, dim),
              "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim),
              "mlp.down_proj": (dim, ffn)}
    out.mkdir(parents=True, exist_ok=True)
    embed = (rng.standard_normal((c["vocab_size"], dim), dtype=np.float32) * 0.02).astype(np.float16)
    save_file({"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(dim, np.float32)},
              str(out / "embed.safetensors"))
    del embed
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {p + n + ".weight": np.ones(dim, np.float32)
                 for n in ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm")}
        layer[p + "mlp.ffn_sub_norm.weight"] = np.ones(ffn, np.float32)
        for name, shape in shapes.items():
            layer[p + name + ".weight"] = pack_hf(rng.integers(0, 3, shape, dtype=np.uint8))
            layer[p + name + ".weight_scale"] = np.array([0.02], np.float32)
        save_file(layer, str(out / f"layer-{i:02d}.safetensors"))
        print(f"layer {i + 1}/{c['num_hidden_layers']}", end="\r", flush=True)
    (out / "config.json").write_text(json.dumps(c, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-models/2b4t-random"))
