"""ModelConfig: the few numbers and switches that define a ternary transformer, read from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ternlm.errors import FormatError

# Architectures ternlm runs, by the Hugging Face class name in config.json.
BITNET_ARCHS = {"BitNetForCausalLM", "BitnetForCausalLM"}
LLAMA_ARCHS = {"LlamaForCausalLM"}
ACTIVATIONS = {"relu2", "silu"}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a BitNet b1.58 or ternary Llama model."""

    arch: str  # "bitnet" (2B4T, 1bitLLM) or "llama" (HF1BitLLM, Falcon3-1.58bit)
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    hidden_act: str = "relu2"
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    # How a stored per-tensor weight_scale is applied: "multiply" (autobitlinear) or "divide" (bitlinear).
    scale_mode: str = "divide"
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise FormatError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"{self.n_heads} heads is not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise FormatError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise FormatError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.scale_mode not in ("multiply", "divide"):
            raise FormatError(f"unknown weight scale mode {self.scale_mode!r}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Map a Hugging Face config.json to ours; unknown keys are ignored, missing required ones named."""
        archs = raw.get("architectures") or []
        name = archs[0] if archs else ""
        quant = raw.get("quantization_config") or {}
        if name in BITNET_ARCHS or raw.get("model_type") == "bitnet":
            arch = "bitnet"
        elif name in LLAMA_ARCHS and quant.get("quant_method") == "bitnet":
            arch = "llama"
        elif name in LLAMA_ARCHS:
            raise FormatError(f"{source}: a LlamaForCausalLM without a bitnet quantization_config is not ternary")
        else:
            raise FormatError(f"{source}: unknown architecture {name or raw.get('model_type')!r}; ternlm runs "
                              f"{sorted(BITNET_ARCHS | LLAMA_ARCHS)}")
        if quant and quant.get("quant_method") not in (None, "bitnet"):
            raise FormatError(f"{source}: quantization method {quant.get('quant_method')!r} is not ternary")
        if quant.get("use_rms_norm"):
            raise FormatError(f"{source}: quantization_config.use_rms_norm is not supported yet")
        scale_mode = "multiply" if quant.get("linear_class") == "autobitlinear" else "divide"

        def need(key: str) -> Any:
            if key not in raw:
                raise FormatError(f"{source}: missing required key {key!r}")
            return raw[key]

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise FormatError(f"{source}: rope type {rope_type!r} is not supported yet")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10_000.0))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        n_heads = int(need("num_attention_heads"))
        try:
            return cls(
                arch=arch,
                dim=int(need("hidden_size")),
                n_layers=int(need("num_hidden_layers")),
                n_heads=n_heads,
                n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
                ffn_dim=int(need("intermediate_size")),
                vocab_size=int(need("vocab_size")),
                head_dim=int(raw.get("head_dim") or 0),
                hidden_act=str(raw.get("hidden_act", "relu2" if arch == "bitnet" else "silu")),
                rope_theta=float(theta),
                norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                max_seq_len=int(raw.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                scale_mode=scale_mode,
                bos_id=raw.get("bos_token_id"),
                eos_ids=eos_ids,
            )
        except FormatError as e:
            raise FormatError(f"{source}: {e}") from e
        except (TypeError, ValueError) as e:
            raise FormatError(f"{source}: bad value: {e}") from e
