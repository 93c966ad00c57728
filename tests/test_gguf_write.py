"""GGUF writing (ternlm.formats.gguf_write): the file's contents, llama.cpp running it, and reading it back.

Why the llama.cpp tolerances: both engines quantize activations to int8, differently. ternlm quantizes
per token (absmax of the whole vector), as BitNet specifies; llama.cpp's TQ1_0/TQ2_0 dot products quantize
per 256-value block (Q8_K), and it keeps the KV cache in F16 and rounds the activations of an F16 head to
F16. Measured on the test models below against a float-activation forward of the same weights
(transformers, plain linear layers), each engine is off by as much as the two differ from each other:
mean|diff|/std(logits) is 0.020 for ternlm and 0.019 for llama.cpp, 0.018 between them (bitnet); 0.0060,
0.0059 and 0.0043 (llama). The gap is the rounding noise of two int8 quantizers, not an error in the file.
The test models get 4x their q/k scales: with the random weights' near-uniform attention, a wrong q/k row
order (RoPE pairing) moved the logits by only 1.5 % of their spread; with sharper attention it moves them
by 23 % (top-1 agreement 47 %). The right files measured, over all llama.cpp cases here:
mean|diff|/std <= 0.019, max|diff|/max|logit| <= 0.013, cosine >= 0.9990 at every position, top-1
agreement 100 %. The asserted bounds are 1.6 to 2 times those.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import ternlm
from ternlm.errors import FormatError, ParamError, TernlmError
from ternlm.formats import LoadedModel, open_model
from ternlm.formats.gguf_write import LLAMA3_REGEX, i2_s_bytes, quantize_q6_k, tq2_0_bytes, write_gguf
from ternlm.layers import FloatMatrix, TernaryLinear
from tiny_models import toy_model_path

gguf = pytest.importorskip("gguf", reason="writing GGUF needs the gguf package")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' bitnet code is torch.compile'd: 60 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT = toy_model_path()  # F16 embedding, 640-wide FFN: exact F16 round trips, F16 fallback rows
TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 300, 64)]
QT = gguf.GGMLQuantizationType
TOLERANCE = {"mean_rel": 0.03, "max_rel": 0.025, "cos_min": 0.998, "top1": 0.95}  # see the module docstring
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "it's 12345 o'clock, isn't it?!!  Numbers: 3.14159 and 1,000,000.",
    "  leading spaces\tand\ttabs\r\n\r\nend  ",
    "def f(x):\n    return x * 2  # code with    spaces\n\n",
    "日本語のテキストも少し入れておきます。中文分词测试：你好，世界！",
    "Emoji 😀🎉👍🏽 café naïve Zürich, Ελληνικά, русский. <|eot_id|> after a special token",
]


def quiet_write(model: LoadedModel, out: Path, **kwargs: str) -> list[str]:
    """write_gguf, returning the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_gguf(model, out, **kwargs)
    return [str(w.message) for w in caught]


def read(path: Path) -> tuple[dict, dict]:
    """(metadata values, tensors by name) of a GGUF file, through gguf-py's reader."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(t: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's values as float32 (rows, cols), dequantized by gguf-py (independent of our writer)."""
    shape = [int(n) for n in reversed(t.shape.tolist())]
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)


def projection(model: LoadedModel, name: str) -> tuple[TernaryLinear, int, int]:
    """(stacked layer, first row, end row) of layer 0's projection `name` ("attn_q", ...)."""
    c, lw = model.config, model.weights.layers[0]
    return {"attn_q": (lw.qkv, 0, c.q_dim), "attn_k": (lw.qkv, c.q_dim, c.q_dim + c.kv_dim),
            "attn_v": (lw.qkv, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim), "attn_output": (lw.o, 0, c.dim),
            "ffn_gate": (lw.gate_up, 0, c.ffn_dim), "ffn_up": (lw.gate_up, c.ffn_dim, 2 * c.ffn_dim),
            "ffn_down": (lw.down, 0, c.dim)}[name]


def row_scales(model: LoadedModel, name: str) -> np.ndarray:
    lin, r0, r1 = projection(model, name)
    return np.broadcast_to(np.asarray(lin.scale, np.float32), (lin.out_features,))[r0:r1]


def ternary_values(model: LoadedModel, name: str) -> np.ndarray:
    """What a projection's GGUF tensor must hold: ternary values times the row's float16 scale."""
    lin, r0, r1 = projection(model, name)
    half = row_scales(model, name).astype(np.float16).astype(np.float32)
    return (lin.codes(r0, r1).astype(np.float32) - 1) * half[:, None]


# ---- arguments and file contents (no llama.cpp, no torch) -----------------------------------------


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return open_model(DEFAULT)


@pytest.mark.parametrize("kwargs", [{"ternary_type": "Q4_0"}, {"ternary_type": "I8_S"}, {"head_type": "BF16"},
                                    {"head_type": "TQ2_0"}, {"ternary_type": None}, {"head_type": 8}])
def test_unknown_types_are_param_errors(default_model: LoadedModel, tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ParamError, match=r"ternary_type|head_type"):
        write_gguf(default_model, tmp_path / "m.gguf", **kwargs)
    assert not list(tmp_path.iterdir())


def test_needs_the_gguf_package(default_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(TernlmError, match="pip install gguf"):
        write_gguf(default_model, tmp_path / "m.gguf")


def test_bad_model_and_paths(default_model: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="LoadedModel"):
        write_gguf(str(DEFAULT), tmp_path / "m.gguf")  # a path, not what open_model returns
    with pytest.raises(ParamError, match="is a directory"):
        write_gguf(default_model, tmp_path)
    with pytest.raises(ParamError, match="no such directory"):
        write_gguf(default_model, tmp_path / "missing" / "m.gguf")
    with pytest.raises(ParamError, match="name must be a string"):
        write_gguf(default_model, tmp_path / "m.gguf", name=3)


def test_tokenizers_that_cannot_be_written(default_model: LoadedModel, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from ternlm.tokenizer import Tokenizer

    words = HFTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    model = LoadedModel(default_model.config, default_model.weights, Tokenizer(words))
    with pytest.raises(FormatError, match="only byte-level BPE"):
        quiet_write(model, tmp_path / "m.gguf")
    small = dataclasses.replace(default_model.config, vocab_size=200)  # fewer rows than the tokenizer has ids
    with pytest.raises(FormatError, match="embedding has 200 rows"):
        quiet_write(LoadedModel(small, default_model.weights, default_model.tokenizer), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_unknown_word_split_falls_back_to_gpt2(default_model: LoadedModel, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ternlm.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    messages = quiet_write(LoadedModel(default_model.config, default_model.weights, Tokenizer(tok)),
                           tmp_path / "m.gguf")
    assert any("matches no llama.cpp pre-tokenizer; writing 'gpt-2'" in m for m in messages)
    assert read(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == "gpt-2"


def test_default_model_file_contents(default_model: LoadedModel, tmp_path: Path) -> None:
    """The shipped model: relu² (warned), FFN width 640 (down_proj falls back to F16), a 0-merge byte vocab."""
    out = tmp_path / "m.gguf"
    messages = quiet_write(default_model, out, ternary_type="tq1_0", name="tiny")
    assert any("relu²" in m for m in messages)
    assert any("F16" in m and "ffn_down" in m for m in messages)
    assert len(messages) == 2  # no word-split warning: without merges, every split gives the same ids
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind

    meta, tensors = read(out)
    c, tok = default_model.config, default_model.tokenizer
    assert meta["general.architecture"] == "bitnet" and meta["general.name"] == "tiny"
    assert meta["bitnet.hidden_activation"] == "relu2"
    assert (meta["bitnet.embedding_length"], meta["bitnet.block_count"], meta["bitnet.feed_forward_length"],
            meta["bitnet.attention.head_count"], meta["bitnet.attention.head_count_kv"],
            meta["bitnet.rope.dimension_count"]) == (c.dim, c.n_layers, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim)
    assert meta["bitnet.rope.freq_base"] == c.rope_theta
    assert meta["bitnet.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ1_0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    n = tok.vocab_size  # 259: the embedding's other 61 rows get unused placeholder tokens
    assert meta["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(n)] + [
        f"[PAD{i}]" for i in range(n, c.vocab_size)]
    types = meta["tokenizer.ggml.token_type"]
    assert types[:n] == [1] * 256 + [3] * 3 and types[n:] == [5] * (c.vocab_size - n)  # NORMAL, CONTROL, UNUSED
    assert meta["tokenizer.ggml.merges"] == ["<| |>"]  # gguf-py drops an empty list; llama.cpp needs the key
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (256, 258)
    assert meta["tokenizer.ggml.add_bos_token"] is True

    assert len([n for n in tensors if n.endswith(".weight")]) == 2 + 11 * c.n_layers
    assert "output.weight" not in tensors  # tied
    assert tensors["token_embd.weight"].tensor_type == QT.F16
    np.testing.assert_array_equal(values(tensors["token_embd.weight"]),
                                  default_model.weights.embed.rows(np.arange(c.vocab_size)))
    np.testing.assert_array_equal(values(tensors["blk.0.attn_sub_norm.weight"]),
                                  default_model.weights.layers[0].attn_sub_norm)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        t = tensors[f"blk.0.{name}.weight"]
        assert t.tensor_type == (QT.F16 if name == "ffn_down" else QT.TQ1_0), name
        np.testing.assert_array_equal(values(t), ternary_values(default_model, name), err_msg=name)
        # This model's scales are float32 numbers: each comes back as block scale x the `.scale` ratio.
        scale = row_scales(default_model, name)[0]
        ratio = values(tensors[f"blk.0.{name}.scale"])[0]
        assert np.float32(np.float16(scale)) * ratio == scale and scale != np.float16(scale), name


def test_tq2_0_and_tq1_0_hold_the_same_values(default_model: LoadedModel, tmp_path: Path) -> None:
    quiet_write(default_model, tmp_path / "a.gguf", ternary_type="TQ2_0")
    quiet_write(default_model, tmp_path / "b.gguf", ternary_type="TQ1_0")
    (_, a), (_, b) = read(tmp_path / "a.gguf"), read(tmp_path / "b.gguf")
    assert a["blk.1.ffn_up.weight"].tensor_type == QT.TQ2_0 and b["blk.1.ffn_up.weight"].tensor_type == QT.TQ1_0
    assert a["blk.1.ffn_up.weight"].n_bytes == 66 * 640 and b["blk.1.ffn_up.weight"].n_bytes == 54 * 640
    for name in a:
        np.testing.assert_array_equal(values(a[name]), values(b[name]), err_msg=name)


@pytest.mark.parametrize("head", ["F32", "F16", "Q8_0", "Q6_K", "Q4_0"])
def test_head_types(default_model: LoadedModel, tmp_path: Path, head: str) -> None:
    """Every head type decodes (by gguf-py) to the embedding, within the type's own precision; ternlm's own
    Q8_0/Q4_0 heads are copied bit for bit."""
    out = tmp_path / "m.gguf"
    quiet_write(default_model, out, head_type=head)
    emb = values(read(out)[1]["token_embd.weight"])
    ref = default_model.weights.embed.rows(np.arange(default_model.config.vocab_size))
    if head in ("F32", "F16"):
        np.testing.assert_array_equal(emb, ref)
    else:
        step = {"Q8_0": 1 / 127, "Q6_K": 1 / 31, "Q4_0": 1 / 7}[head]  # of each block's largest value
        assert np.abs(emb - ref).max() <= 0.5 * step * np.abs(ref).max() * 1.01
    if head in ("Q8_0", "Q4_0"):
        model = ternlm.load(DEFAULT, head=head.lower())
        quiet_write(LoadedModel(model.config, model.weights, model.tokenizer), out, head_type=head)
        np.testing.assert_array_equal(values(read(out)[1]["token_embd.weight"]),
                                      model.weights.embed.rows(np.arange(model.config.vocab_size)))


def test_q6_k_layout_matches_gguf_dequantizer() -> None:
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32) * np.float32(0.02)
    q = quantize_q6_k(x)
    assert q.shape == (3, 2 * 210)
    back = gguf.quants.dequantize(q, QT.Q6_K).reshape(3, 512)
    assert np.abs(back - x).max() <= 0.5 / 31 * np.abs(x).max() * 1.01


# ---- tiny Hugging Face checkpoints (need torch + transformers to write) ---------------------------


def tiny_checkpoint(path: Path, arch: str, layout: str, act: str = "silu", **config: object) -> Path:
    pytest.importorskip("torch", reason="tiny checkpoints are packed with transformers")
    pytest.importorskip("transformers")
    from tiny_models import tiny_config, write_checkpoint

    return write_checkpoint(path, {**tiny_config(arch, dim=256, ffn=512), "hidden_act": act, **config}, layout,
                            seed=7)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> dict[str, Path]:
    """bitnet: 1bitLLM-style (SiLU, sub-norms, tied); bitnet_relu2: 2B4T-style; llama: HF1BitLLM-style (untied).
    Each with the byte-level BPE tokenizer of conftest (GPT-2 split, ~600 ids)."""
    root = tmp_path_factory.mktemp("hf")
    ids = {"vocab_size": 640, "bos_token_id": 0, "eos_token_id": 1}
    paths = {"bitnet": tiny_checkpoint(root / "bitnet", "bitnet", "packed_autobitlinear", **ids),
             "bitnet_relu2": tiny_checkpoint(root / "relu2", "bitnet", "packed_autobitlinear", act="relu2", **ids),
             "llama": tiny_checkpoint(root / "llama", "llama", "packed_bitlinear", **ids)}
    for path in paths.values():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(byte_tokenizer_dir / name, path / name)
    return paths


def test_rows_that_do_not_fit_blocks(tmp_path: Path) -> None:
    """Width 128: the projections fall back to F16 (warned); a 256-block head type is refused."""
    hf = tiny_checkpoint(tmp_path / "hf", "bitnet", "packed_autobitlinear", hidden_size=128, intermediate_size=320)
    model = open_model(hf)
    with pytest.raises(FormatError, match=r"Q6_K.*256-value blocks"):
        quiet_write(model, tmp_path / "m.gguf", head_type="Q6_K")
    messages = quiet_write(model, tmp_path / "m.gguf", head_type="Q8_0")
    assert any(re.match(r"14 ternary tensors.*F16", m) for m in messages)
    tensors = read(tmp_path / "m.gguf")[1]
    assert tensors["blk.0.attn_q.weight"].tensor_type == QT.F16
    np.testing.assert_array_equal(values(tensors["blk.0.ffn_gate.weight"]), ternary_values(model, "ffn_gate"))


def test_untied_bitnet_is_refused(tmp_path: Path) -> None:
    hf = tiny_checkpoint(tmp_path / "hf", "bitnet", "packed_autobitlinear", tie_word_embeddings=False)
    with pytest.raises(FormatError, match="no separate output head"):
        write_gguf(open_model(hf), tmp_path / "m.gguf")


def test_block_scaled_layer(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A layer read from a TQ file whose blocks disagree within a row (formats.gguf's BlockScaledLinear) is
    written block by block; two scales inside one 256-value block cannot be, and say so."""
    reader = pytest.importorskip("ternlm.formats.gguf", reason="ternlm's GGUF reader is not there yet")
    model = open_model(checkpoints["bitnet"])
    down = model.weights.layers[0].down  # (256, 512): two blocks per row
    codes, s = down.codes(), np.float32(np.asarray(down.scale).flat[0])
    first, second = codes.copy(), codes.copy()
    first[:, 256:], second[:, :256] = 1, 1  # block 0 in one part, block 1 in the other
    parts = [TernaryLinear.from_codes(first, float(s)), TernaryLinear.from_codes(second, float(2 * s))]
    model.weights.layers[0].down = reader.BlockScaledLinear(parts)
    quiet_write(model, tmp_path / "m.gguf")
    got = values(read(tmp_path / "m.gguf")[1]["blk.0.ffn_down.weight"])
    h = np.float32(np.float16(s))
    np.testing.assert_array_equal(got, np.concatenate([(first[:, :256] - 1.0) * h, (second[:, 256:] - 1.0) * 2 * h],
                                                      axis=1))
    second[:, 255] = 2  # part two now reaches into block 0
    model.weights.layers[0].down = reader.BlockScaledLinear(
        [parts[0], TernaryLinear.from_codes(second, float(2 * s))])
    with pytest.raises(FormatError, match="mixes weights of different scales"):
        write_gguf(model, tmp_path / "m.gguf")


def test_llama_q_k_rows_are_interleaved(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """llama: q/k rows reordered per head from rotate-half to interleaved pairs; v and the rest as they are."""
    model = open_model(checkpoints["llama"])
    quiet_write(model, tmp_path / "m.gguf")
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama" and "llama.hidden_activation" not in meta
    assert "output.weight" in tensors and "blk.0.attn_sub_norm.weight" not in tensors
    hd = model.config.head_dim
    for name, heads in (("attn_q", model.config.n_heads), ("attn_k", model.config.n_kv_heads)):
        want = ternary_values(model, name).reshape(heads, 2, hd // 2, -1).transpose(0, 2, 1, 3).reshape(heads * hd, -1)
        np.testing.assert_array_equal(values(tensors[f"blk.0.{name}.weight"]), want)
    np.testing.assert_array_equal(values(tensors["blk.0.attn_v.weight"]), ternary_values(model, "attn_v"))


# ---- llama.cpp itself -----------------------------------------------------------------------------


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp oracle needs llama-cpp-python")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, n_threads=1)
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(ours - ref)
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    return {"mean_rel": float(diff.mean() / ref.std()), "max_rel": float(diff.max() / np.abs(ref).max()),
            "cos_min": float(cos.min()), "top1": float(np.mean(ours.argmax(-1) == ref.argmax(-1)))}


def assert_agrees(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    got = agreement(ours, ref)
    print(what, {k: round(v, 6) for k, v in got.items()})
    assert got["mean_rel"] < TOLERANCE["mean_rel"] and got["max_rel"] < TOLERANCE["max_rel"], (what, got)
    assert got["cos_min"] > TOLERANCE["cos_min"] and got["top1"] >= TOLERANCE["top1"], (what, got)


def sharpened(path: Path, head: str = "float") -> ternlm.api.Model:
    """The model with 4x q/k scales (see the module docstring), as ternlm runs it."""
    model = ternlm.load(path, head=head)
    c = model.config
    for lw in model.weights.layers:
        lw.qkv.scale = lw.qkv.scale.copy()
        lw.qkv.scale[:c.q_dim + c.kv_dim] *= 4
    return model


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_llama_cpp_logits_agree(checkpoints: dict[str, Path], tmp_path: Path, arch: str, ternary_type: str) -> None:
    model = sharpened(checkpoints[arch])
    out = tmp_path / "m.gguf"
    messages = quiet_write(LoadedModel(model.config, model.weights, None), out, ternary_type=ternary_type)
    assert len(messages) == 1 and "no tokenizer" in messages[0]  # llama.cpp runs ids with no vocabulary
    assert_agrees(llama_cpp_logits(out, TOKENS), model.logits(TOKENS), f"{arch} {ternary_type}")


@pytest.mark.parametrize("head", ["Q8_0", "Q6_K", "Q4_0"])
def test_llama_cpp_runs_quantized_heads(checkpoints: dict[str, Path], tmp_path: Path, head: str) -> None:
    """Compared with ternlm running the same head type (Q8_0, Q4_0), or, for Q6_K, which ternlm does not
    run, a float head holding the Q6_K values."""
    model = sharpened(checkpoints["bitnet"], head={"Q6_K": "float"}.get(head, head.lower()))
    out = tmp_path / "m.gguf"
    quiet_write(LoadedModel(model.config, model.weights, None), out, head_type=head)
    if head == "Q6_K":
        model.weights.embed = model.weights.head = FloatMatrix(values(read(out)[1]["token_embd.weight"]), "F32")
        model.transformer.w = model.weights
    assert_agrees(llama_cpp_logits(out, TOKENS), model.logits(TOKENS), f"head {head}")


def test_llama_cpp_computes_silu_for_relu2(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The documented limit: llama.cpp 0.3.36 runs a relu² BitNet with SiLU. Its logits are those of the same
    weights with SiLU, far from the model's own. If llama.cpp learns relu², this test should change."""
    model = sharpened(checkpoints["bitnet_relu2"])
    out = tmp_path / "m.gguf"
    assert any("computes that arch with SiLU" in m for m in quiet_write(LoadedModel(model.config, model.weights, None),
                                                                        out))
    theirs, own = llama_cpp_logits(out, TOKENS), model.logits(TOKENS)
    assert agreement(theirs, own)["mean_rel"] > 0.1
    model.transformer.config = dataclasses.replace(model.config, hidden_act="silu")
    assert_agrees(theirs, model.logits(TOKENS), "relu2 as silu")


def llama3_style_tokenizer(path: Path) -> None:
    """A tiny byte-level BPE split like Llama 3's tokenizer.json: Split(Llama-3 regex) then ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": specials[0], "eos_token": specials[2], "add_bos_token": True,
              "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "default"])
def test_llama_cpp_tokenizes_like_ternlm(tmp_path: Path, byte_tokenizer_dir: Path, kind: str) -> None:
    """The vocabulary, merges and pre-tokenizer name written make llama.cpp's ids equal ternlm's."""
    if kind == "default":
        path, pre = DEFAULT, "gpt-2"  # no split regex and no merges: every split gives the same ids
    else:
        path = tiny_checkpoint(tmp_path / "hf", "bitnet", "packed_autobitlinear", vocab_size=640, bos_token_id=0,
                               eos_token_id=2)
        if kind == "gpt2":
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(byte_tokenizer_dir / name, path / name)
        else:
            llama3_style_tokenizer(path)
        pre = {"gpt2": "gpt-2", "llama3": "llama-bpe"}[kind]
    model = open_model(path)
    out = tmp_path / "m.gguf"
    quiet_write(model, out)
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp oracle needs llama-cpp-python")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    assert llm.metadata.get("tokenizer.chat_template") == model.tokenizer.chat_template
    assert (llm.token_bos(), llm.token_eos()) == (model.tokenizer.bos_id,
                                                  model.tokenizer.token_to_id(model.tokenizer.eos_token))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == model.tokenizer.encode(text), text
    llm.close()


# ---- reading the file back (needs ternlm's GGUF reader) -------------------------------------------


def close_to(ours: np.ndarray, ref: np.ndarray, what: str, median: float = 1e-3) -> None:
    """The foundation tests' tolerance (tests/test_model.py check_close, which explains it)."""
    per_position = np.mean(np.abs(ours - ref), axis=-1) / np.std(ref)
    top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    summary = (f"{what}: relative diff median {np.median(per_position):.1e}, mean {per_position.mean():.1e}, "
               f"max {per_position.max():.1e}, top-1 {top1:.0%}")
    print(summary)
    assert np.median(per_position) < median and per_position.mean() < 1e-2, summary
    assert per_position.max() < 0.1 and top1 >= 0.95, summary


@pytest.mark.oracle
@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
@pytest.mark.parametrize("arch", ["bitnet_relu2", "llama"])
def test_round_trip_through_gguf(checkpoints: dict[str, Path], tmp_path: Path, arch: str, ternary_type: str) -> None:
    """HF -> GGUF -> ternlm gives transformers' logits: the 2B4T layout (bf16 weight_scale = mean|W|, a
    float16 number) and HF1BitLLM's (weight_scale = 1/mean|W|, whose inverse needs the `.scale` ratio)."""
    pytest.importorskip("ternlm.formats.gguf", reason="ternlm's GGUF reader is not there yet")
    from tiny_models import hf_logits

    out = tmp_path / "m.gguf"
    source = open_model(checkpoints[arch])
    quiet_write(source, out, ternary_type=ternary_type)
    model = ternlm.load(out, head="float")
    assert model.config.hidden_act == source.config.hidden_act, "the GGUF reader must read bitnet.hidden_activation"
    for text in TEXTS:
        assert model.tokenizer.encode(text) == source.tokenizer.encode(text), text
    tokens = TOKENS + TOKENS[::-1]
    ours = model.logits(tokens)
    # The file holds the checkpoint's ternary codes, scales and norms exactly, so ternlm reading the checkpoint
    # itself gives the same logits: bit for bit (bitnet_relu2), or 9.5e-7 off (llama: F16 rounds one bf16 head
    # value below its normal range). Machine-independent: both sides run the same kernels on the same values.
    np.testing.assert_allclose(ours, ternlm.load(checkpoints[arch], head="float", cache=False).logits(tokens),
                               rtol=0, atol=1e-5)
    # Against transformers, one int8 rounding flip at position p moves every later position by ~5e-3 (the later
    # queries read p's changed keys and values; that ~3e-4 change flips a few roundings at each of them). Where
    # the first flip falls depends on the machine's float summation order: here a 1-ulp difference in one
    # layer-0 activation at position 57 of 128 gives a median of 3.3e-3. A real bug moves positions by ~1.
    close_to(ours, hf_logits(checkpoints[arch], tokens), f"{arch} {ternary_type} vs transformers", median=1e-2)


def test_default_model_round_trip(default_model: LoadedModel, tmp_path: Path) -> None:
    """The shipped model (relu², F16-fallback down_proj, a byte vocabulary without merges) reads back the same."""
    pytest.importorskip("ternlm.formats.gguf", reason="ternlm's GGUF reader is not there yet")
    out = tmp_path / "m.gguf"
    quiet_write(default_model, out, ternary_type="TQ1_0")
    model = ternlm.load(out, head="float")
    assert model.config.hidden_act == "relu2", "the GGUF reader must read bitnet.hidden_activation"
    for text in TEXTS:
        assert model.tokenizer.encode(text) == default_model.tokenizer.encode(text), text
    tokens = model.tokenizer.encode(TEXTS[0])
    close_to(model.logits(tokens), ternlm.load(DEFAULT, head="float").logits(tokens), "default model")


def test_tq2_0_blocks_from_codes_match_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    codes = np.random.default_rng(0).integers(0, 3, (3, 512), dtype=np.uint8)
    scale = np.array([0.5, 0.25, 0.125], np.float32)
    raw = tq2_0_bytes(codes, scale)
    assert raw.shape == (3, 2 * 66)
    np.testing.assert_array_equal(dequantize(raw, gguf.GGMLQuantizationType.TQ2_0),
                                  (codes.astype(np.float32) - 1) * scale[:, None])


# ---- I2_S, for bitnet.cpp ---------------------------------------------------------------------------


def test_i2_s_layout() -> None:
    """bitnet.cpp's x86 I2_S: the tensor as one run of 128-value blocks; byte j of a block holds values j, 32 + j,
    64 + j, 96 + j in bits 7-6, 5-4, 3-2, 1-0; then the float32 scale in a 32-byte tail."""
    codes = np.zeros((2, 128), np.uint8)  # two rows = two blocks
    codes[0, 5], codes[0, 32 + 5], codes[0, 64 + 5], codes[0, 96 + 5] = 2, 1, 0, 2  # byte 5: 10 01 00 10
    codes[1, 31] = 1  # block 1, byte 31, bits 7-6
    raw = i2_s_bytes(codes, np.float32(0.375))
    assert raw.dtype == np.uint8 and raw.shape == (2 * 32 + 32,)
    expect = np.zeros(64, np.uint8)
    expect[5], expect[32 + 31] = 0b10010010, 0b01000000
    np.testing.assert_array_equal(raw[:64], expect)
    assert raw[64:68].view("<f4")[0] == np.float32(0.375) and not raw[68:].any()


def test_i2_s_round_trip(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """HF -> I2_S GGUF -> ternlm: bitnet.cpp's arch and metadata, no `.scale` tensors (bitnet.cpp refuses extra
    tensors; the float32 scale needs none), and the checkpoint's logits bit for bit."""
    from ternlm.formats.gguf import read_gguf

    out = tmp_path / "m.gguf"
    source = open_model(checkpoints["bitnet_relu2"])
    assert quiet_write(source, out, ternary_type="I2_S") == []
    f = read_gguf(out)
    assert f.metadata["general.architecture"] == "bitnet-b1.58" and f.metadata["general.file_type"] == 40
    assert f.metadata["bitnet-b1.58.attention.layer_norm_rms_epsilon"] == pytest.approx(source.config.norm_eps)
    types = {name: t.type_id for name, t in f.tensors.items()}
    assert sum(t == 36 for t in types.values()) == 7 * source.config.n_layers
    assert types["token_embd.weight"] == QT.F16 and "output.weight" not in types
    assert not [name for name in types if name.endswith(".scale")]
    q = f.tensors["blk.0.attn_q.weight"]
    assert q.nbytes == 256 * 256 // 4 + 32
    model = ternlm.load(out, head="float")
    assert model.config.hidden_act == "relu2"
    assert model.tokenizer.encode(TEXTS[0]) == source.tokenizer.encode(TEXTS[0])
    tokens = TOKENS + TOKENS[::-1]
    np.testing.assert_array_equal(model.logits(tokens),
                                  ternlm.load(checkpoints["bitnet_relu2"], head="float", cache=False).logits(tokens))


def test_i2_s_refusals(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """What bitnet.cpp's `bitnet-b1.58` cannot compute, or I2_S cannot hold, is refused before a file appears."""
    with pytest.raises(FormatError, match="relu² BitNet"):
        write_gguf(open_model(checkpoints["bitnet"]), tmp_path / "m.gguf", ternary_type="I2_S")  # SiLU
    with pytest.raises(FormatError, match="relu² BitNet"):
        write_gguf(open_model(checkpoints["llama"]), tmp_path / "m.gguf", ternary_type="I2_S")
    model = open_model(checkpoints["bitnet_relu2"])
    lin = model.weights.layers[0].down
    lin.scale = np.linspace(0.5, 1.0, lin.out_features, dtype=np.float32)  # one scale per row
    with pytest.raises(FormatError, match=r"blk\.0\.ffn_down\.weight: its rows have different weight scales"):
        write_gguf(model, tmp_path / "m.gguf", ternary_type="I2_S")
    assert not list(tmp_path.iterdir())


def test_i2_s_untied_head_is_refused(tmp_path: Path) -> None:
    hf = tiny_checkpoint(tmp_path / "hf", "bitnet", "packed_autobitlinear", act="relu2", tie_word_embeddings=False)
    with pytest.raises(FormatError, match=r"bitnet\.cpp.*no separate output head"):
        write_gguf(open_model(hf), tmp_path / "m.gguf", ternary_type="I2_S")


@pytest.mark.parametrize("sharpen", [False, True])
def test_bitnet_cpp_logits_agree(checkpoints: dict[str, Path], tmp_path: Path, sharpen: bool) -> None:
    """bitnet.cpp runs ternlm's I2_S file of a relu² model with ternlm's logits. bitnet.cpp is not a package:
    set TERNLM_BITNET_CPP to a local build of github.com/microsoft/BitNet (its source tree, built with cmake
    into build/). Measured with the 2026-03 build: mean|diff|/std 0.012 (0.017 sharpened), max 0.007 (0.013),
    cosine >= 0.9991, top-1 100 %, the same agreement as llama.cpp's (module docstring)."""
    root = os.environ.get("TERNLM_BITNET_CPP")
    if not root:
        pytest.skip("set TERNLM_BITNET_CPP to a bitnet.cpp source tree with a build/ to check against it")
    root, lib = Path(root), Path(root) / "build" / "3rdparty" / "llama.cpp"
    driver = tmp_path / "logits"
    subprocess.run(["gcc", "-O2", str(Path(__file__).with_name("bitnet_cpp_logits.c")), "-o", str(driver),
                    f"-I{root / '3rdparty/llama.cpp/include'}", f"-I{root / '3rdparty/llama.cpp/ggml/include'}",
                    f"-L{lib / 'src'}", f"-L{lib / 'ggml/src'}", "-lllama", "-lggml",
                    f"-Wl,-rpath,{lib / 'src'}:{lib / 'ggml/src'}"], check=True)
    model = sharpened(checkpoints["bitnet_relu2"]) if sharpen else ternlm.load(checkpoints["bitnet_relu2"],
                                                                               head="float", cache=False)
    out = tmp_path / "m.gguf"
    write_gguf(LoadedModel(model.config, model.weights, None), out, ternary_type="I2_S")
    (tmp_path / "tokens.txt").write_text(" ".join(map(str, TOKENS)))
    run = subprocess.run([str(driver), str(out), str(tmp_path / "tokens.txt")], capture_output=True, text=True,
                         check=True)
    theirs = np.array([line.split() for line in run.stdout.splitlines()], np.float32)
    assert_agrees(theirs, model.logits(TOKENS), f"bitnet.cpp I2_S{' sharpened' if sharpen else ''}")
