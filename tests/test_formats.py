"""Loading Hugging Face directories: the safetensors reader, layouts, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ternlm
from ternlm.errors import FormatError
from ternlm.formats.hf import pack_hf, unpack_hf
from ternlm.formats.safetensors import read_safetensors

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def write_st(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    safetensors_numpy.save_file(tensors, str(path))
    return path


def test_reader_matches_safetensors_package(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.integers(0, 255, (7,), np.uint8),
               "c": rng.standard_normal((2, 2, 2)).astype(np.float16), "empty": np.zeros((0, 4), np.float32)}
    got = read_safetensors(write_st(tmp_path / "x.safetensors", tensors))
    assert set(got) == set(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got[name].data, arr)
        assert got[name].data.dtype == arr.dtype


def test_reader_bf16_is_raw_bits(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    x = torch.tensor([1.0, -2.5, 3.140625, 0.0], dtype=torch.bfloat16)
    save_file({"x": x}, str(tmp_path / "b.safetensors"))
    t = read_safetensors(tmp_path / "b.safetensors")["x"]
    assert t.dtype == "BF16"
    np.testing.assert_array_equal(ternlm.ternary.bf16_to_f32(t.data), x.float().numpy())


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=0, max_value=400), flips=st.lists(st.tuples(st.integers(0, 400),
                                                                             st.integers(0, 255)), max_size=4))
def test_reader_never_crashes_on_damaged_files(tmp_path_factory, cut: int, flips: list) -> None:
    """Truncated or garbled files raise FormatError (or load consistently); nothing else escapes."""
    tmp = tmp_path_factory.mktemp("fuzz")
    good = write_st(tmp / "good.safetensors", {"w": np.arange(24, dtype=np.float32).reshape(4, 6),
                                               "u": np.arange(10, dtype=np.uint8)})
    raw = bytearray(good.read_bytes())
    raw = raw[:min(cut, len(raw))] if cut < len(raw) else raw
    for pos, val in flips:
        if pos < len(raw):
            raw[pos] = val
    bad = tmp / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        tensors = read_safetensors(bad)
    except FormatError as e:
        assert "bad.safetensors" in str(e)
        return
    for t in tensors.values():  # whatever loaded must be backed by real bytes of the file
        assert t.data.nbytes <= len(raw)
        np.asarray(t.data).sum()


@pytest.mark.parametrize("header, problem", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode(), "outside"),
    (json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(), "bytes of data"),
    (json.dumps({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}).encode(), "unsupported dtype"),
    (json.dumps({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}).encode(), "bad shape"),
])
def test_reader_errors_name_file_and_problem(tmp_path: Path, header: bytes, problem: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(FormatError, match=problem) as err:
        read_safetensors(path)
    assert "m.safetensors" in str(err.value)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="exceeds the file size"):
        read_safetensors(path)


@given(st.integers(1, 40), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_hf_pack_round_trip(out_f: int, in_f: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 3, (out_f, in_f)).astype(np.uint8)
    packed = pack_hf(codes)
    assert packed.shape == ((out_f + 3) // 4, in_f)
    np.testing.assert_array_equal(unpack_hf(packed, out_f), codes)


def test_hf_unpack_matches_transformers() -> None:
    """Row-block packing: bit field i of packed row r is logical row i*R + r, as transformers packs it."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.bitnet import pack_weights

    w = torch.randint(-1, 2, (24, 7), generator=torch.Generator().manual_seed(3)).float()
    packed = pack_weights(w.clone()).numpy()
    np.testing.assert_array_equal(unpack_hf(packed, 24).astype(np.int8) - 1, w.numpy().astype(np.int8))
    np.testing.assert_array_equal(pack_hf((w.numpy() + 1).astype(np.uint8)), packed)


# --- whole directories ------------------------------------------------------------------------------

def copy_default(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(ternlm.api.default_model_path(), dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(path: Path, edit) -> None:
    st_path = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_numpy.load_file(str(st_path)).items()}
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(st_path))


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such file"):
        ternlm.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"no config\.json"):
        ternlm.load(tmp_path / "empty")


def test_gguf_magic_is_recognised_not_guessed_from_name(tmp_path: Path) -> None:
    """A file named model.bin that starts with b"GGUF" goes to the GGUF reader (which rejects this one's version)."""
    (tmp_path / "model.bin").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(FormatError, match=r"model\.bin: GGUF version 0 is not supported"):
        ternlm.load(tmp_path / "model.bin")


@pytest.mark.parametrize("changes, problem", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unknown architecture"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "quantization_config": None}, "not ternary"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_attention_heads": 3}, "heads"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type"),
])
def test_bad_config(tmp_path: Path, changes: dict, problem: str) -> None:
    path = copy_default(tmp_path)
    edit_config(path, **changes)
    with pytest.raises(FormatError, match=problem) as err:
        ternlm.load(path)
    assert "config.json" in str(err.value)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = copy_default(tmp_path)
    rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        ternlm.load(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = copy_default(tmp_path)

    def shrink(t: dict) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:, :-1].copy()

    rewrite_tensors(path, shrink)
    with pytest.raises(FormatError, match=r"k_proj\.weight.*shape"):
        ternlm.load(path)


def test_invalid_code_and_scale(tmp_path: Path) -> None:
    path = copy_default(tmp_path)
    rewrite_tensors(path, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), 0xFF))
    with pytest.raises(FormatError, match="down_proj"):
        ternlm.load(path)
    path = copy_default(tmp_path / "b")
    rewrite_tensors(path, lambda t: t.__setitem__("model.layers.0.mlp.gate_proj.weight_scale",
                                                  np.array([-1.0], np.float32)))
    with pytest.raises(FormatError, match="positive"):
        ternlm.load(path)


def test_truncated_weights_file(tmp_path: Path) -> None:
    path = copy_default(tmp_path)
    st_path = path / "model.safetensors"
    st_path.write_bytes(st_path.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="truncated"):
        ternlm.load(path)


def test_shard_index_with_missing_file(tmp_path: Path) -> None:
    path = copy_default(tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}}))
    with pytest.raises(FormatError, match="missing"):
        ternlm.load(path)
