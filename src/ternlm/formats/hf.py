"""Load Hugging Face checkpoint directories: config.json plus one or more .safetensors files.

Linear weights come in two layouts, told apart by dtype:
- packed uint8 (out/4, in) + weight_scale: four codes w+1 per byte, bit field i of packed row r holding
  logical row i*(out/4) + r (microsoft/bitnet-b1.58-2B-4T, HF1BitLLM, Falcon3-1.58bit);
- float latent weights (out, in) in bf16/f16/f32, ternarized here with the per-tensor absmean rule
  (bitnet-b1.58-2B-4T-bf16, 1bitLLM/bitnet_b1_58-*).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ternlm import ternary
from ternlm.config import ModelConfig
from ternlm.errors import FormatError, ShapeError
from ternlm.formats.safetensors import Tensor, read_safetensors
from ternlm.layers import FloatMatrix, TernaryLinear
from ternlm.model import LayerWeights, ModelWeights

# Our name -> checkpoint names (the first present wins): 1bitLLM models name the sub-norms differently.
LINEARS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
SUB_NORMS = {
    "attn_sub_norm": ("self_attn.attn_sub_norm", "self_attn.inner_attn_ln"),
    "ffn_sub_norm": ("mlp.ffn_sub_norm", "mlp.ffn_layernorm"),
}


def load_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FormatError(f"{path}: no config.json: not a Hugging Face model directory") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{file}: cannot parse: {e}") from e
    if not isinstance(raw, dict):
        raise FormatError(f"{file}: not a JSON object")
    return ModelConfig.from_hf(raw, source=str(file))


def read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of the directory's safetensors files, following the shard index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: bad shard index: {e}") from e
        for name in files:
            if not (path / name).is_file():
                raise FormatError(f"{index}: lists {name}, which is missing")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no .safetensors files")
    tensors: dict[str, Tensor] = {}
    for name in files:
        for key, tensor in read_safetensors(path / name).items():
            if key in tensors:
                raise FormatError(f"{path / name}: tensor {key!r} also appears in {tensors[key].file.name}")
            tensors[key] = tensor
    return tensors


def load_hf(path: Path) -> tuple[ModelConfig, ModelWeights]:
    """Read config and weights of a Hugging Face BitNet / ternary Llama directory."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory")
    config = load_config(path)
    tensors = read_tensors(path)
    c = config

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in tensors:
            raise FormatError(f"{path}: missing tensor {name!r}")
        t = tensors[name]
        if t.shape != shape:
            raise FormatError(f"{t.file}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def vector(name: str, n: int) -> np.ndarray:
        return as_f32(get(name, (n,)))

    def first_present(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in tensors), None)

    shapes = {"q": (c.q_dim, c.dim), "k": (c.kv_dim, c.dim), "v": (c.kv_dim, c.dim), "o": (c.dim, c.q_dim),
              "gate": (c.ffn_dim, c.dim), "up": (c.ffn_dim, c.dim), "down": (c.dim, c.ffn_dim)}
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        lin = {key: ternary_linear(tensors, p + LINEARS[key], shapes[key], c.scale_mode, path)
               for key in LINEARS}
        sub = {}
        for key, names in SUB_NORMS.items():
            found = first_present(tuple(p + n + ".weight" for n in names))
            n = c.q_dim if key == "attn_sub_norm" else c.ffn_dim
            sub[key] = vector(found, n) if found else None
        layers.append(LayerWeights(
            attn_norm=vector(p + "input_layernorm.weight", c.dim),
            ffn_norm=vector(p + "post_attention_layernorm.weight", c.dim),
            qkv=TernaryLinear.concat([lin["q"], lin["k"], lin["v"]]), o=lin["o"],
            gate_up=TernaryLinear.concat([lin["gate"], lin["up"]]), down=lin["down"], **sub,
        ))
    embed = float_matrix(get("model.embed_tokens.weight", (c.vocab_size, c.dim)))
    if "lm_head.weight" in tensors and not c.tie_embeddings:
        head = float_matrix(get("lm_head.weight", (c.vocab_size, c.dim)))
    else:
        head = embed
    return config, ModelWeights(embed=embed, norm=vector("model.norm.weight", c.dim), head=head, layers=layers)


def ternary_linear(tensors: dict[str, Tensor], name: str, shape: tuple[int, int], scale_mode: str,
                   path: Path) -> TernaryLinear:
    """One linear layer from either layout, checked against the shape the config implies."""
    out_f, in_f = shape
    if name + ".weight" not in tensors:
        raise FormatError(f"{path}: missing tensor {name + '.weight'!r}")
    t = tensors[name + ".weight"]
    if t.dtype == "U8":
        rows = (out_f + 3) // 4
        if t.shape != (rows, in_f):
            raise FormatError(f"{t.file}: packed tensor {t.name!r} has shape {list(t.shape)}, expected "
                              f"{[rows, in_f]} for a {out_f}x{in_f} ternary matrix")
        scale_t = tensors.get(name + ".weight_scale")
        if scale_t is None:
            raise FormatError(f"{t.file}: packed tensor {t.name!r} has no {name + '.weight_scale'!r}")
        if scale_t.data.size != 1 or scale_t.dtype not in ("F32", "F16", "BF16"):
            raise FormatError(f"{scale_t.file}: {scale_t.name!r} must be one float, got {scale_t.dtype} "
                              f"{list(scale_t.shape)}")
        stored = float(as_f32(scale_t).reshape(-1)[0])
        if not np.isfinite(stored) or stored <= 0:
            raise FormatError(f"{scale_t.file}: {scale_t.name!r} is {stored}, must be a positive number")
        codes = unpack_hf(t.data, out_f)
        t.release()
        try:
            return TernaryLinear.from_codes(codes, stored if scale_mode == "multiply" else 1.0 / stored)
        except ShapeError as e:
            raise FormatError(f"{t.file}: tensor {t.name!r}: {e}") from e
    if t.dtype in ("F32", "F16", "BF16"):
        if t.shape != shape:
            raise FormatError(f"{t.file}: tensor {t.name!r} has shape {list(t.shape)}, expected {list(shape)}")
        weights = as_f32(t)
        t.release()
        return TernaryLinear.from_float(weights)
    raise FormatError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}; expected U8 (packed) or a float type")


def unpack_hf(packed: np.ndarray, out_features: int) -> np.ndarray:
    """Codes (out, in) from the Hugging Face row-block packing: field i of row r is logical row i*R + r."""
    fields = np.stack([(packed >> (2 * i)) & 3 for i in range(4)])  # (4, R, in)
    codes = fields.reshape(-1, packed.shape[1])[:out_features]
    return codes


def pack_hf(codes: np.ndarray) -> np.ndarray:
    """Codes (out, in) in {0, 1, 2} to the Hugging Face packing (ceil(out/4), in) uint8; inverse of unpack_hf."""
    rows = (codes.shape[0] + 3) // 4
    padded = np.ones((4 * rows, codes.shape[1]), dtype=np.uint8)  # pad rows hold code 1 (weight 0)
    padded[:codes.shape[0]] = codes
    fields = padded.reshape(4, rows, codes.shape[1])
    return fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)


def as_f32(t: Tensor) -> np.ndarray:
    """A float32 copy: a view would keep the whole file mapped, and its touched pages resident."""
    if t.dtype == "BF16":
        return ternary.bf16_to_f32(t.data)
    if t.dtype in ("F32", "F16", "F64"):
        return np.array(t.data, dtype=np.float32)
    raise FormatError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}, expected a float type")


def float_matrix(t: Tensor) -> FloatMatrix:
    if t.dtype not in ("F32", "F16", "BF16"):
        raise FormatError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}, expected F32, F16 or BF16")
    return FloatMatrix(t.data, t.dtype)
