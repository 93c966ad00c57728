"""ternlm.hub against a Hugging Face cache built in tmp_path: no test here may reach the network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

import ternlm
from ternlm import hub
from ternlm.errors import FormatError, ParamError, TernlmError

COMMIT = "1" * 40
COMMIT2 = "2" * 40
TOKENS = [1, 5, 9, 42, 7]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a hub test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub and ternlm.hub both use, set after huggingface_hub's import."""
    path = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # other test modules set HF_HUB_OFFLINE=1 before huggingface_hub is imported, which it reads only then
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_config(), "packed_autobitlinear")


@pytest.fixture(scope="module")
def reference_logits(checkpoint: Path) -> np.ndarray:
    return ternlm.load(checkpoint).logits(TOKENS)


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes | Path], *, commit: str = COMMIT,
               ref: str | None = "main", listed: tuple[str, ...] = ("README.md", ".gitattributes"),
               repo_type: str = "model") -> Path:
    """Lay out a repo as huggingface_hub does: blobs/, refs/<ref>, snapshots/<commit>/ symlinks into blobs,
    and the tree listing (trees/<commit>.json) that records every file of the commit, `listed` included."""
    storage = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    tree = {}
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[name] = {"size": len(data), "blob_id": blob.name}
    tree.update({name: {"size": 1, "blob_id": "0" * 40} for name in listed})
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    if ref:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def checkpoint_files(checkpoint: Path) -> dict[str, bytes | Path]:
    return {p.name: p for p in checkpoint.iterdir()}


GGUF = b"GGUF" + bytes(60)


# -- repo ids and resolve ---------------------------------------------------------------------------------------

def test_known_repos_are_repo_ids() -> None:
    assert "microsoft/bitnet-b1.58-2B-4T" in hub.KNOWN_REPOS
    assert "tiiuae/Falcon-E-3B-Instruct" in hub.KNOWN_REPOS
    assert all(hub.is_repo_id(r) for r in hub.KNOWN_REPOS)


def test_is_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.is_repo_id("org/name") and hub.is_repo_id("org/name@main")
    for text in ("name", "a/b/c", "./x", "/abs/path", "org/name@", "org/na me", "org--x/y"):
        assert not hub.is_repo_id(text), text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_repo_id("org/name")  # an existing local path wins


def test_resolve_none_and_local_paths(tmp_path: Path, cache: Path) -> None:
    assert hub.resolve(None) is None
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path)) == tmp_path


def test_resolve_cached_repo_loads(cache: Path, checkpoint: Path, reference_logits: np.ndarray) -> None:
    snapshot = cache_repo(cache, "org/tiny", checkpoint_files(checkpoint))
    cache_repo(cache, "org/tiny", {"config.json": b"{}"}, commit=COMMIT2, ref="v2")
    assert hub.resolve("org/tiny") == snapshot
    assert hub.resolve("org/tiny@main") == snapshot
    assert hub.resolve(f"org/tiny@{COMMIT}") == snapshot
    assert hub.resolve("org/tiny@v2") == snapshot.parent / COMMIT2
    np.testing.assert_array_equal(ternlm.load(hub.resolve("org/tiny")).logits(TOKENS), reference_logits)


def test_resolve_missing_says_how_to_pull(cache: Path) -> None:
    with pytest.raises(ParamError, match=r"org/missing is neither a local path nor a model in the Hugging Face "
                                         r"cache .*run `ternlm pull org/missing`"):
        hub.resolve("org/missing")
    cache_repo(cache, "org/tiny", {"config.json": b"{}"})
    with pytest.raises(ParamError, match="run `ternlm pull org/tiny@nope`"):
        hub.resolve("org/tiny@nope")
    with pytest.raises(ParamError, match="neither a local path"):
        hub.resolve("no-such-file.gguf")


def test_resolve_gguf_repo_gives_the_file(cache: Path) -> None:
    snapshot = cache_repo(cache, "org/one-gguf", {"ggml-model-i2_s.gguf": GGUF})
    assert hub.resolve("org/one-gguf") == snapshot / "ggml-model-i2_s.gguf"
    snapshot = cache_repo(cache, "org/two-gguf", {"a.gguf": GGUF, "b.gguf": GGUF + b"x"})
    assert hub.resolve("org/two-gguf") == snapshot


def test_resolve_incomplete_snapshot(cache: Path, checkpoint: Path) -> None:
    index = {"weight_map": {"w.a": "model-00001-of-00002.safetensors", "w.b": "model-00002-of-00002.safetensors"}}
    cache_repo(cache, "org/cut", {"config.json": b"{}", "model-00001-of-00002.safetensors": b"x",
                                  "model.safetensors.index.json": json.dumps(index).encode()},
               listed=("model-00002-of-00002.safetensors",))
    with pytest.raises(ParamError, match="incomplete; run `ternlm pull org/cut`"):
        hub.resolve("org/cut")
    # Pulled with narrower patterns (one GGUF of two): what is there is a whole model.
    snapshot = cache_repo(cache, "org/some-gguf", {"a.gguf": GGUF}, listed=("b.gguf",))
    assert hub.resolve("org/some-gguf") == snapshot / "a.gguf"


# -- pull -------------------------------------------------------------------------------------------------------

def test_pull_offline_uses_the_cache(cache: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = cache_repo(cache, "org/tiny", checkpoint_files(checkpoint))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.pull("org/tiny") == snapshot
    with pytest.raises(TernlmError, match=r"org/missing is not in the Hugging Face cache .* offline mode is on"):
        hub.pull("org/missing")
    cache_repo(cache, "org/cut", {"config.json": b"{}"}, listed=("model.safetensors",))
    with pytest.raises(TernlmError, match="incomplete and offline mode is on"):
        hub.pull("org/cut")


def test_pull_online_arguments(cache: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(cache_repo(cache, repo_id, checkpoint_files(checkpoint)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    snapshot = hub.pull("org/tiny@v1", progress=False)
    assert snapshot == cache / "models--org--tiny" / "snapshots" / COMMIT
    call = calls[-1]
    assert call["repo_id"] == "org/tiny" and call["revision"] == "v1"
    assert Path(call["cache_dir"]) == cache
    assert call["allow_patterns"] == list(hub.DEFAULT_PATTERNS)
    assert call["local_files_only"] is False
    assert not call.get("force_download")  # files already cached are kept: an interrupted pull continues
    assert call["tqdm_class"](total=1).disable is True
    hub.pull("org/tiny", allow_patterns=["*.gguf"])
    assert calls[-1]["revision"] is None and calls[-1]["tqdm_class"] is None
    assert calls[-1]["allow_patterns"] == ["*.gguf"]
    with pytest.raises(ParamError, match="not a Hugging Face repo id"):
        hub.pull("just-a-name")


def test_pull_maps_hub_errors(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("cannot find the requested files") from ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(TernlmError, match=r"cannot reach the Hugging Face Hub to download org/tiny .*run pull again"):
        hub.pull("org/tiny")

    def nothing_matched(repo_id: str, **kwargs: object) -> str:
        return str(cache / "models--org--bin" / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", nothing_matched)
    with pytest.raises(TernlmError, match="holds no files matching"):
        hub.pull("org/bin")


# -- list and remove ----------------------------------------------------------------------------------------------

def test_list_and_remove(cache: Path) -> None:
    assert hub.list_models() == []  # no cache directory yet
    one = cache_repo(cache, "org/one", {"config.json": b"{}", "model.safetensors": b"a" * 100})
    cache_repo(cache, "org/one", {"config.json": b"{}", "model.safetensors": b"b" * 50}, commit=COMMIT2, ref="v2")
    cache_repo(cache, "org/two", {"m.gguf": GGUF})
    cache_repo(cache, "org/data", {"train.json": b"[]"}, repo_type="dataset")
    models = hub.list_models()
    assert [(m.repo_id, m.revision) for m in models if m.repo_id == "org/one"] in (
        [("org/one", "main"), ("org/one", "v2")], [("org/one", "v2"), ("org/one", "main")])
    assert {m.repo_id for m in models} == {"org/one", "org/two"}
    main = next(m for m in models if m.repo_id == "org/one" and m.revision == "main")
    assert main.path == one and main.size_bytes == 102 and main.commit == COMMIT and main.last_modified > 0
    assert next(m for m in models if m.repo_id == "org/two").path.name == "m.gguf"

    assert hub.remove("org/one@v2") == 50  # config.json's blob is shared with main and stays
    assert [m.revision for m in hub.list_models() if m.repo_id == "org/one"] == ["main"]
    assert hub.remove("org/one") == 102  # org/two's revision has the same commit hash and must stay
    assert not (cache / "models--org--one").exists()
    assert {m.repo_id for m in hub.list_models()} == {"org/two"}
    with pytest.raises(ParamError, match="org/one is not in the Hugging Face cache"):
        hub.remove("org/one")
    with pytest.raises(ParamError, match="no cached revision 'v9'"):
        hub.remove("org/two@v9")


# -- export / import ------------------------------------------------------------------------------------------------

def test_export_import_round_trip(cache: Path, checkpoint: Path, reference_logits: np.ndarray, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cache_repo(cache, "org/tiny", checkpoint_files(checkpoint))
    archive = hub.export_model("org/tiny", tmp_path / "tiny.tar")
    sidecar = tmp_path / "tiny.tar.sha256"
    assert sidecar.read_text() == f"{hashlib.sha256(archive.read_bytes()).hexdigest()}  tiny.tar\n"
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile(hub.MANIFEST))
        assert all(not m.issym() for m in tar.getmembers())  # the cache's symlinks were followed
    assert manifest["source"] == {"repo_id": "org/tiny", "commit": COMMIT}
    assert {e["name"] for e in manifest["files"]} == {f"org--tiny/{n}" for n in checkpoint_files(checkpoint)}
    assert all(e["sha256"] == hashlib.sha256((checkpoint / e["name"].split("/")[1]).read_bytes()).hexdigest()
               for e in manifest["files"])

    monkeypatch.setenv("TERNLM_HOME", str(tmp_path / "home"))
    imported = hub.import_model(archive)
    assert imported == tmp_path / "home" / "models" / "org--tiny"
    np.testing.assert_array_equal(ternlm.load(imported).logits(TOKENS), reference_logits)
    with pytest.raises(ParamError, match="already exists"):
        hub.import_model(archive)

    # A local directory and a lone GGUF file round-trip too; an existing directory as OUT gets <name>.tar.
    local = hub.export_model(checkpoint, tmp_path)
    assert local == tmp_path / "ckpt.tar"
    assert hub.import_model(local, tmp_path / "copy") == tmp_path / "copy"
    (tmp_path / "m.gguf").write_bytes(GGUF)
    single = hub.import_model(hub.export_model(tmp_path / "m.gguf", tmp_path / "m.tar"), tmp_path / "in" / "m.gguf")
    assert single.read_bytes() == GGUF


def flip_byte_in(archive: Path, member: str) -> None:
    with tarfile.open(archive) as tar:
        offset = tar.getmember(member).offset_data + 10
    with open(archive, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_tampered_archive_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    archive = hub.export_model(checkpoint, tmp_path / "t.tar")
    flip_byte_in(archive, "ckpt/model.safetensors")
    with pytest.raises(FormatError, match=r"t.tar: sha256 .* does not match .*t.tar.sha256"):
        hub.import_model(archive, tmp_path / "out")
    (tmp_path / "t.tar.sha256").unlink()  # without the sidecar the manifest still catches it, naming the member
    with pytest.raises(FormatError, match=r"member ckpt/model.safetensors has sha256 .* the manifest says"):
        hub.import_model(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging cleaned up


def hostile_archive(path: Path, name: str, *, link: str | None = None) -> Path:
    """A tar whose manifest lists `name` with the right checksum, so only the path checks can stop it."""
    data = b"payload"
    manifest = {"format": hub.EXPORT_FORMAT, "version": hub.EXPORT_VERSION, "root": "m", "kind": "directory",
                "files": [{"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        blob = json.dumps(manifest).encode()
        info = tarfile.TarInfo(hub.MANIFEST)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.mark.parametrize("name,link", [("m/../../evil", None), ("/tmp/evil", None), ("../evil", None),
                                       ("m/evil", "../../evil"), ("m/evil", "/etc/passwd")])
def test_unsafe_members_are_refused(tmp_path: Path, name: str, link: str | None) -> None:
    archive = hostile_archive(tmp_path / "bad.tar", name, link=link)
    with pytest.raises(FormatError, match=r"unsafe path|is a link"):
        hub.import_model(archive, tmp_path / "dest" / "m")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "dest" / "m").exists()


def test_import_rejects_foreign_tars(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    with pytest.raises(FormatError, match="not a `ternlm export` archive"):
        hub.import_model(tmp_path / "plain.tar", tmp_path / "x")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(FormatError, match="not a readable uncompressed tar"):
        hub.import_model(tmp_path / "junk.tar", tmp_path / "y")
