"""ternlm's own .tlm file: exact round trips, no-copy mapping, checksums, damaged files, and the load cache."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ternlm
from ternlm.config import ModelConfig
from ternlm.errors import FormatError
from ternlm.formats import LoadedModel, native
from ternlm.formats.native import ALIGN, NATIVE_MAGIC, load_native, verify_native, write_native
from ternlm.layers import FloatMatrix, TernaryLinear
from ternlm.model import LayerWeights, ModelWeights
from tiny_models import tiny_config, write_checkpoint

TOKENS = [1, 5, 7, 9, 100, 250, 3]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
PREFIX = struct.Struct("<8sIIQ")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> dict[str, Path]:
    """Tiny HF checkpoints with the byte tokenizer: a tied BitNet and an untied ternary Llama."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {"bitnet": write_checkpoint(root / "bitnet", tiny_config(vocab=640), "packed_autobitlinear"),
            "llama": write_checkpoint(root / "llama", tiny_config("llama", vocab=640), "packed_bitlinear", seed=1)}
    for d in dirs.values():
        for f in byte_tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
    return dirs


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $TERNLM_HOME per test, so cache files of one test never serve another."""
    home = tmp_path / "home"
    monkeypatch.setenv("TERNLM_HOME", str(home))
    monkeypatch.delenv("TERNLM_NO_CACHE", raising=False)
    return home


def synthetic(vocab: int = 64, dim: int = 64, n_layers: int = 1, embed_dtype: type = np.float32,
              seed: int = 0) -> LoadedModel:
    """A random model built directly in numpy (no torch): small, or with a big embedding for RSS checks."""
    rng = np.random.default_rng(seed)
    config = ModelConfig(arch="bitnet", dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1, ffn_dim=dim,
                         vocab_size=vocab, max_seq_len=64)

    def lin(out: int, inp: int) -> TernaryLinear:
        return TernaryLinear.from_codes(rng.integers(0, 3, (out, inp), dtype=np.uint8), float(rng.uniform(0.1, 1)))

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    kv = config.kv_dim
    layers = [LayerWeights(attn_norm=norm(dim), ffn_norm=norm(dim), attn_sub_norm=norm(dim), ffn_sub_norm=norm(dim),
                           qkv=TernaryLinear.concat([lin(dim, dim), lin(kv, dim), lin(kv, dim)]), o=lin(dim, dim),
                           gate_up=TernaryLinear.concat([lin(dim, dim), lin(dim, dim)]), down=lin(dim, dim))
              for _ in range(n_layers)]
    if embed_dtype == np.float32:
        embed = FloatMatrix(rng.standard_normal((vocab, dim), dtype=np.float32), "F32")
    else:  # values in [0, 1) straight from random bits: no float64 temporary for big tables
        embed = FloatMatrix(rng.integers(0, 0x3C00, (vocab, dim), dtype=np.uint16).view(np.float16), "F16")
    return LoadedModel(config, ModelWeights(embed=embed, norm=norm(dim), head=embed, layers=layers), None)


def data_start(raw: bytes) -> int:
    return -(-(PREFIX.size + PREFIX.unpack_from(raw)[3]) // ALIGN) * ALIGN


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header and the absolute offset of the data section."""
    raw = path.read_bytes()
    return json.loads(raw[PREFIX.size:PREFIX.size + PREFIX.unpack_from(raw)[3]]), data_start(raw)


def rewrite_header(path: Path, header: dict | bytes, version: int = native.FORMAT_VERSION) -> None:
    """Replace the header (a dict, or raw bytes) keeping the data section, with a valid header checksum."""
    old = path.read_bytes()
    data = old[data_start(old):]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = PREFIX.pack(NATIVE_MAGIC, version, zlib.crc32(raw), len(raw)) + raw
    path.write_bytes(prefix + bytes(-len(prefix) % ALIGN) + data)


def mmap_base(arr: np.ndarray) -> object:
    """What owns an array's memory (np.frombuffer on an mmap: a memoryview of the mmap)."""
    while isinstance(arr, np.ndarray) and arr.base is not None:
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


def all_arrays(w: ModelWeights) -> list[np.ndarray]:
    arrays = [w.norm, *(vars(w.embed).values()), *(vars(w.head).values())]
    for lw in w.layers:
        arrays += [lw.attn_norm, lw.ffn_norm, lw.attn_sub_norm, lw.ffn_sub_norm]
        arrays += [a for lin in lw.linears() for a in (lin.packed, lin.scale)]
    return [a for a in arrays if isinstance(a, np.ndarray)]


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
@pytest.mark.parametrize("head", ["q8_0", "q4_0", "float"])
@pytest.mark.parametrize("layout", ["i2", "tq1"])
def test_round_trip_is_exact(hf_dirs: dict[str, Path], tmp_path: Path, arch: str, head: str, layout: str) -> None:
    source = ternlm.load(hf_dirs[arch], head=head, weights=layout, cache=False)
    out = write_native(LoadedModel(source.config, source.weights, source.tokenizer), tmp_path / "m.tlm")
    model = ternlm.load(out, head=head, weights=layout)

    assert model.config == source.config
    np.testing.assert_array_equal(model.logits(TOKENS), source.logits(TOKENS))
    w = model.weights
    assert (w.head is w.embed) == (arch == "bitnet")
    assert w.head.dtype == source.weights.head.dtype and w.embed.dtype == source.weights.embed.dtype
    assert {lin.layout for lw in w.layers for lin in lw.linears()} == {layout}
    bases = {id(mmap_base(a)) for a in all_arrays(w)}
    assert len(bases) == 1 and type(mmap_base(w.norm)).__name__ == "mmap"
    assert not any(a.flags.writeable for a in all_arrays(w))

    tok, ref = model.tokenizer, source.tokenizer
    text = "Hello world! The quick brown fox. 日本語 😀"
    assert tok.encode(text) == ref.encode(text) and tok.encode(text, add_bos=False) == ref.encode(text, add_bos=False)
    assert (tok.eos_ids, tok.bos_id, tok.eos_token, tok.add_bos_token) == (ref.eos_ids, ref.bos_id, ref.eos_token,
                                                                          ref.add_bos_token)
    assert model.chat_tokens(MESSAGES) == source.chat_tokens(MESSAGES)
    assert model.stop_ids == source.stop_ids
    assert verify_native(out) == []


def test_model_without_tokenizer(tmp_path: Path) -> None:
    out = write_native(synthetic(), tmp_path / "s.tlm")
    loaded = load_native(out)
    assert loaded.tokenizer is None and loaded.weights.head is loaded.weights.embed
    np.testing.assert_array_equal(loaded.weights.embed.weight, synthetic().weights.embed.weight)


def test_convert_from_directory_and_from_a_tlm_file(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    first = native.convert_native(hf_dirs["bitnet"], tmp_path / "a.tlm", head="q4_0", weights="tq1")
    again = native.convert_native(first, tmp_path / "b.tlm")  # keeps Q4_0 and tq1: nothing converts back
    a, b = ternlm.load(first), ternlm.load(again)
    assert b.info()["head_dtype"] == "Q4_0" and b.info()["ternary_layout"] == "tq1"
    np.testing.assert_array_equal(a.logits(TOKENS), b.logits(TOKENS))
    assert native.is_native(again) and not native.is_native(hf_dirs["bitnet"])


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = write_native(synthetic(), tmp_path / "s.tlm")
    before = out.read_bytes()

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(native.os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        write_native(synthetic(seed=1), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.tlm"]


def test_load_maps_instead_of_copying(tmp_path: Path) -> None:
    """A 64 MB embedding: loading maps it (its pages are the page cache's, shared with any other process
    mapping the file) and copies none of it into the process's own memory."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc/self/status")
    out = write_native(synthetic(vocab=131072, dim=256, embed_dtype=np.float16), tmp_path / "big.tlm")

    def anonymous() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    before = anonymous()
    loaded = load_native(out)
    grown = anonymous() - before
    assert type(mmap_base(loaded.weights.embed.weight)).__name__ == "mmap"
    assert grown < out.stat().st_size // 20, f"private memory grew by {grown} bytes, file {out.stat().st_size}"


def _mount_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest mount point that is a prefix of it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, fs = line.split()[:3]
        if str(path.resolve()).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fs
    return kind


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="needs Linux huge pages")
def test_written_file_leaves_the_page_cache_and_maps_for_huge_pages(tmp_path: Path) -> None:
    """Pages left cached by the write would stay 4 KiB-mapped: the writer evicts them, and the loader's
    mapping asks for 2 MiB pages (VmFlags "hg")."""
    out = write_native(synthetic(vocab=16384, dim=256, embed_dtype=np.float16), tmp_path / "m.tlm")
    if _mount_type(tmp_path) not in ("tmpfs", "ramfs"):  # in-memory filesystems: the cache is the file
        with open(out, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            vec = (ctypes.c_ubyte * -(-len(mm) // mmap.PAGESIZE))()
            view = np.frombuffer(mm, np.uint8)
            assert ctypes.CDLL(None).mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(len(mm)), vec) == 0
            del view
            assert sum(v & 1 for v in vec) <= 2, "the written file is still in the page cache"
    loaded = load_native(out)
    start = loaded.weights.embed.weight.ctypes.data
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?^VmFlags:([^\n]*)", Path("/proc/self/smaps").read_text(),
                         re.M | re.S):
        if int(m[1], 16) <= start < int(m[2], 16):
            assert "hg" in m[3].split(), f"mapping flags {m[3]}"
            return
    pytest.fail("the embedding's mapping is not in /proc/self/smaps")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="needs Linux huge pages")
def test_load_maps_small_cached_pages_again_as_huge_pages(tmp_path: Path) -> None:
    """Half the file rewritten in place (the same bytes) sits in the page cache in 4 KiB pages: the loader
    hands those back and maps the whole file on 2 MiB pages, where this filesystem supports them at all."""
    out = write_native(synthetic(vocab=65536, dim=512, embed_dtype=np.float16), tmp_path / "m.tlm")
    mm = native._open(out)[0]
    mm.madvise(native._MADV_POPULATE_READ)
    resident, huge = native._mapped_pages(mm)
    mm.close()
    if huge < resident // 2:
        pytest.skip(f"this filesystem maps files on small pages ({huge} of {resident} bytes on 2 MiB pages)")
    size = out.stat().st_size
    fd = os.open(out, os.O_RDWR)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pwrite(fd, os.pread(fd, size // 2, size // 2), size // 2)
        os.fsync(fd)
    finally:
        os.close(fd)
    loaded = load_native(out)
    resident, huge = native._mapped_pages(mmap_base(loaded.weights.embed.weight))
    assert huge >= resident * 9 // 10, f"{huge} of {resident} resident bytes on 2 MiB pages"
    ids = np.arange(0, 65536, 997)
    np.testing.assert_array_equal(loaded.weights.embed.rows(ids), synthetic(vocab=65536, dim=512,
                                                                            embed_dtype=np.float16).weights.embed.rows(ids))


# ---------------------------------------------------------------- checksums and damaged files


def test_verify_names_the_tensor_with_a_flipped_byte(tmp_path: Path) -> None:
    out = write_native(synthetic(), tmp_path / "s.tlm")
    header, start = read_header(out)
    raw = bytearray(out.read_bytes())
    raw[start + header["tensors"]["layers.0.gate_up.packed"]["offset"] + 10] ^= 0x40
    out.write_bytes(bytes(raw))
    load_native(out)  # loading does not read the data, so it stays fast
    problems = verify_native(out)
    assert len(problems) == 1 and "'layers.0.gate_up.packed'" in problems[0] and str(out) in problems[0]


def _drop(key: str) -> Callable[[dict], None]:
    return lambda h: h["tensors"].pop(key)


def _set(key: str, field: str, value: object) -> Callable[[dict], None]:
    return lambda h: h["tensors"][key].__setitem__(field, value)


LIES = {
    "offset beyond EOF": (_set("norm", "offset", 1 << 30), "beyond the end"),
    "misaligned offset": (_set("norm", "offset", 4100), "not a multiple"),
    "negative offset": (_set("norm", "offset", -4096), "bad offset"),
    "negative shape": (_set("norm", "shape", [-64]), "bad shape"),
    "huge shape": (_set("embed.weight", "shape", [1 << 62, 1 << 62]), "bad shape"),
    "zero-size huge shape": (_set("embed.weight", "shape", [0, 1 << 50]), "bad shape"),
    "nbytes mismatch": (_set("norm", "nbytes", 4), "do not hold"),
    "dtype mismatch": (_set("norm", "dtype", "I8"), "do not hold"),
    "unknown dtype": (_set("norm", "dtype", "F64"), "unknown dtype"),
    "wrong shape for config": (lambda h: h["config"].__setitem__("dim", 128), "expected"),
    "missing tensor": (_drop("layers.0.o.packed"), "missing tensor 'layers.0.o.packed'"),
    "bad config type": (lambda h: h["config"].__setitem__("n_layers", "2"), "n_layers"),
    "unknown config field": (lambda h: h["config"].__setitem__("moe", 8), "unknown fields"),
    "too few layers": (lambda h: h["weights"]["layers"].pop(), "layers"),
    "bad layout": (lambda h: h["weights"]["layers"][0]["o"].__setitem__("layout", "q2"), "layout"),
    "bad scale": (lambda h: h["weights"]["layers"][0]["o"].__setitem__("scale", [1]), "bad scale"),
    "bad matrix type": (lambda h: h["weights"]["embed"].__setitem__("type", "Q2_K"), "matrix type"),
    "overlap": (lambda h: h["tensors"]["norm"].__setitem__("offset", h["tensors"]["embed.weight"]["offset"]),
                "overlap"),
    "no tensor table": (lambda h: h.pop("tensors"), "tensor table"),
    "bad tokenizer": (lambda h: h.__setitem__("tokenizer", {"json": "{", "bos_token": None, "eos_token": None,
                                                            "add_bos_token": False, "chat_template": None,
                                                            "eos_ids": []}), "tokenizer"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_header_is_a_format_error(tmp_path: Path, lie: str) -> None:
    mutate, problem = LIES[lie]
    out = write_native(synthetic(), tmp_path / "s.tlm")
    header, _ = read_header(out)
    mutate(header)
    rewrite_header(out, header)
    with pytest.raises(FormatError, match=problem) as e:
        load_native(out)
    assert str(out) in str(e.value)
    assert verify_native(out)


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda raw: raw[:10], "too short"),
    (lambda raw: raw[:300], "runs past the end"),
    (lambda raw: raw[:-5000], "beyond the end"),
    (lambda raw: b"GGUF" + raw[4:], "not a ternlm file"),
    (lambda raw: raw[:30] + bytes([raw[30] ^ 1]) + raw[31:], "header checksum"),
    (lambda raw: raw[:16] + struct.pack("<Q", 1 << 40) + raw[24:], "exceeds the limit"),
])
def test_damaged_file_is_a_format_error(tmp_path: Path, damage: Callable[[bytes], bytes], problem: str) -> None:
    out = write_native(synthetic(), tmp_path / "s.tlm")
    out.write_bytes(damage(out.read_bytes()))
    with pytest.raises(FormatError, match=problem):
        load_native(out)
    assert verify_native(out) and problem in verify_native(out)[0]


def test_unknown_version_and_bad_json(tmp_path: Path) -> None:
    out = write_native(synthetic(), tmp_path / "s.tlm")
    header, _ = read_header(out)
    rewrite_header(out, header, version=2)
    with pytest.raises(FormatError, match="version 2; this ternlm reads version 1"):
        load_native(out)
    for raw, problem in [(b"{not json", "not valid JSON"), (b"[1, 2]", "expected an object"),
                         (b"[" * 100_000, "not valid JSON"), (b"\xff\xfe", "not valid JSON")]:
        rewrite_header(out, raw)
        with pytest.raises(FormatError, match=problem):
            load_native(out)


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict, int]:
    out = write_native(synthetic(), tmp_path_factory.mktemp("fuzz") / "s.tlm")
    header, start = read_header(out)
    return out.read_bytes(), header, start


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_load_or_fail_cleanly(tmp_path: Path, fuzz_source: tuple[bytes, dict, int],
                                            data: st.DataObject) -> None:
    """Byte flips (biased to the prefix and header) and truncations: a model or FormatError, nothing else;
    and verify_native reports every flip that lands in a tensor's data."""
    good, header, start = fuzz_source
    raw = bytearray(good)
    pos = st.one_of(st.integers(0, start - 1), st.integers(0, len(raw) - 1))
    flips = data.draw(st.lists(st.tuples(pos, st.integers(1, 255)), max_size=3))
    for p, x in flips:
        raw[p] ^= x
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    if cut is not None:
        del raw[cut:]
    path = tmp_path / "f.tlm"
    path.write_bytes(bytes(raw))
    try:
        load_native(path)
    except FormatError as e:
        assert str(path) in str(e)
    problems = verify_native(path)
    changed = [p for p, _ in flips if raw[p] != good[p]] if cut is None else []
    hit = {name for p in changed for name, t in header["tensors"].items()
           if start + t["offset"] <= p < start + t["offset"] + t["nbytes"]}
    if hit and all(p >= start for p in changed):
        assert problems and all(any(repr(n) in q for q in problems) for n in hit)


def _slots(node: object) -> list[tuple[dict | list, str | int]]:
    """Every (container, key) of a JSON tree: the places a lying header can put another value."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [slot for key, child in items for slot in [(node, key), *_slots(child)]]


JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=5))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_lying_header_value_is_handled(tmp_path: Path, fuzz_source: tuple[bytes, dict, int],
                                           data: st.DataObject) -> None:
    """Any one value of the header (config, structure or table) replaced, under a valid header checksum."""
    good, header, _ = fuzz_source
    header = json.loads(json.dumps(header))
    container, key = data.draw(st.sampled_from(_slots(header)))
    container[key] = data.draw(st.one_of(JSON_SCALAR, st.lists(JSON_SCALAR, max_size=5),
                                         st.dictionaries(st.text(max_size=5), JSON_SCALAR, max_size=3)))
    path = tmp_path / "f.tlm"
    path.write_bytes(good)
    rewrite_header(path, header)
    with contextlib.suppress(FormatError):
        load_native(path)
    assert isinstance(verify_native(path), list)


# ---------------------------------------------------------------- load cache


@pytest.fixture
def hf_copy(hf_dirs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_dirs["bitnet"], tmp_path / "src"))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The sources actually read by the (slow) format readers."""
    calls: list[Path] = []
    real = native.open_model

    def counting(path: Path) -> LoadedModel:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(native, "open_model", counting)
    return calls


def cache_files(home: Path) -> list[Path]:
    return sorted((home / "cache").glob("*.tlm")) if (home / "cache").exists() else []


def test_second_load_reads_the_cache(hf_copy: Path, reads: list[Path], own_home: Path) -> None:
    first = ternlm.load(hf_copy, weights="tq1")
    assert len(reads) == 1 and len(cache_files(own_home)) == 1
    second = ternlm.load(hf_copy, weights="tq1")
    assert len(reads) == 1
    np.testing.assert_array_equal(second.logits(TOKENS), first.logits(TOKENS))
    assert type(mmap_base(second.weights.layers[0].qkv.packed)).__name__ == "mmap"
    assert second.chat_tokens(MESSAGES) == first.chat_tokens(MESSAGES)
    assert verify_native(cache_files(own_home)[0]) == []

    ternlm.load(hf_copy, weights="i2")  # other options: another cache entry
    assert len(reads) == 2 and len(cache_files(own_home)) == 2


def test_changed_source_invalidates_the_cache(hf_copy: Path, reads: list[Path], own_home: Path) -> None:
    ternlm.load(hf_copy)
    old = cache_files(own_home)
    config = hf_copy / "config.json"
    st_ = config.stat()
    os.utime(config, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    ternlm.load(hf_copy)
    assert len(reads) == 2
    new = cache_files(own_home)
    assert len(new) == 1 and new != old  # the stale entry is removed

    # the same size and mtime but a different header: still a miss
    raw = json.loads(config.read_text())
    raw["rms_norm_eps"] = 2e-5
    text = json.dumps(raw)
    st_ = config.stat()
    config.write_text(text.ljust(st_.st_size) if len(text) <= st_.st_size else text)
    os.utime(config, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert ternlm.load(hf_copy).config.norm_eps == 2e-5
    assert len(reads) == 3


def test_cache_opt_out(hf_copy: Path, reads: list[Path], own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ternlm.load(hf_copy, cache=False)
    ternlm.load(hf_copy, cache=False)
    assert len(reads) == 2 and cache_files(own_home) == []
    monkeypatch.setenv("TERNLM_NO_CACHE", "1")
    ternlm.load(hf_copy)
    assert len(reads) == 3 and cache_files(own_home) == []


def test_corrupt_cache_file_is_replaced(hf_copy: Path, reads: list[Path], own_home: Path) -> None:
    first = ternlm.load(hf_copy)
    (file,) = cache_files(own_home)
    file.write_bytes(file.read_bytes()[:1000])
    again = ternlm.load(hf_copy)
    assert len(reads) == 2
    np.testing.assert_array_equal(again.logits(TOKENS), first.logits(TOKENS))
    assert cache_files(own_home) == [file] and verify_native(file) == []


def test_cache_write_failure_only_warns(hf_copy: Path, reads: list[Path], own_home: Path,
                                        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(native, "write_native", full)
    with caplog.at_level(logging.WARNING, logger="ternlm.formats.native"):
        model = ternlm.load(hf_copy)
    assert model.logits(TOKENS).shape == (len(TOKENS), 640)
    assert "could not write the model cache" in caplog.text and cache_files(own_home) == []


def test_native_files_are_not_cached_again(hf_copy: Path, reads: list[Path], own_home: Path, tmp_path: Path) -> None:
    source = ternlm.load(hf_copy, cache=False)
    out = write_native(LoadedModel(source.config, source.weights, source.tokenizer), tmp_path / "m.tlm")
    ternlm.load(out)
    assert len(reads) == 1 and cache_files(own_home) == []


def test_layers_without_a_packed_form_are_refused(tmp_path: Path) -> None:
    class Scaled(TernaryLinear):  # like a GGUF layer with a scale per 256-block
        pass

    model = synthetic()
    lw = model.weights.layers[0]
    lw.o = Scaled(lw.o.packed, lw.o.in_features, lw.o.scale, lw.o.layout)
    with pytest.raises(FormatError, match="cannot store a Scaled"):
        write_native(model, tmp_path / "s.tlm")
    assert not (tmp_path / "s.tlm").exists()


def test_cache_key_follows_the_i2s_block_setting(hf_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = native.cache_file(hf_copy, "q8_0", "i2")
    monkeypatch.setenv("TERNLM_I2S_BLOCK", "64")
    assert native.cache_file(hf_copy, "q8_0", "i2") != default
