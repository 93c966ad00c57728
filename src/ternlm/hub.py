"""Models from the Hugging Face Hub: download into its cache, find them there, list, remove, and carry them
across an air gap as one checksummed file.

Everything cache-related goes through huggingface_hub (snapshot_download, scan_cache_dir), always with the
cache directory read from the environment at call time: huggingface_hub reads HF_HUB_CACHE / HF_HOME /
HF_HUB_OFFLINE once at import, which would ignore a later change (a test, or a CLI flag setting them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import IO, Any

from ternlm.errors import FormatError, ParamError, TernlmError
from ternlm.paths import home, replacing

KNOWN_REPOS: dict[str, str] = {
    "microsoft/bitnet-b1.58-2B-4T": "BitNet b1.58 2B4T, native 1.58-bit, 4T tokens: packed ternary (run this one)",
    "microsoft/bitnet-b1.58-2B-4T-bf16": "BitNet b1.58 2B4T bf16 master weights (for training); ternarized at load",
    "microsoft/bitnet-b1.58-2B-4T-gguf": "BitNet b1.58 2B4T as an I2_S GGUF (bitnet.cpp's file)",
    "1bitLLM/bitnet_b1_58-large": "0.7B reproduction of the BitNet b1.58 paper, 100B tokens, base; fp16 latent",
    "1bitLLM/bitnet_b1_58-xl": "1.3B reproduction of the BitNet b1.58 paper, 100B tokens, base; fp16 latent",
    "1bitLLM/bitnet_b1_58-3B": "3.3B reproduction of the BitNet b1.58 paper, 100B tokens, base; fp16 latent",
    "HF1BitLLM/Llama3-8B-1.58-100B-tokens": "Llama 3 8B fine-tuned to 1.58 bits on 100B tokens; packed ternary",
    "tiiuae/Falcon3-1B-Instruct-1.58bit": "Falcon3 1B Instruct converted to 1.58 bits; packed ternary",
    "tiiuae/Falcon3-3B-Instruct-1.58bit": "Falcon3 3B Instruct converted to 1.58 bits; packed ternary",
    "tiiuae/Falcon3-7B-Instruct-1.58bit": "Falcon3 7B Instruct converted to 1.58 bits; packed ternary",
    "tiiuae/Falcon3-10B-Instruct-1.58bit": "Falcon3 10B Instruct converted to 1.58 bits; packed ternary",
    "tiiuae/Falcon-E-1B-Instruct": "Falcon-Edge 1B Instruct, native 1.58-bit; packed ternary (default revision)",
    "tiiuae/Falcon-E-3B-Instruct": "Falcon-Edge 3B Instruct, native 1.58-bit; packed ternary (default revision)",
}

# What ternlm reads from a repo: a Hugging Face checkpoint (config, safetensors, tokenizer files) or GGUF files.
# One list for every repo, so the choice follows the files a repo holds rather than its name.
DEFAULT_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
    "*.gguf",
)

MANIFEST = "ternlm-manifest.json"
EXPORT_FORMAT = "ternlm-model-export"
EXPORT_VERSION = 1
_CHUNK = 1 << 20


@dataclass
class LocalModel:
    """One cached revision of a model repo."""

    repo_id: str
    revision: str  # the refs pointing at it ("main"), comma-separated, or the commit hash when none does
    path: Path  # what resolve() gives for it: the snapshot directory, or its single GGUF file
    size_bytes: int
    last_modified: float  # seconds since the epoch, newest file of the revision
    commit: str


# -- the environment ------------------------------------------------------------------------------------------

def _hf() -> ModuleType:
    """huggingface_hub, imported on first use: local paths never need it, and it is slow to import."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError as e:
        raise TernlmError("models from the Hugging Face Hub need the huggingface_hub package: "
                          "pip install huggingface_hub") from e
    return huggingface_hub


def _env_path(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def cache_dir() -> Path:
    """The Hugging Face hub cache, with huggingface_hub's precedence, read from the environment now."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return _env_path(env[name])
    if env.get("HF_HOME"):
        return _env_path(env["HF_HOME"]) / "hub"
    if env.get("XDG_CACHE_HOME"):
        return _env_path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    return _env_path(_hf().constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub saw it at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(_hf().constants.is_offline_mode())


# -- repo ids ---------------------------------------------------------------------------------------------------

def split_revision(text: str) -> tuple[str, str | None]:
    """"org/name@revision" -> ("org/name", "revision"); no "@" -> (text, None)."""
    repo, sep, revision = text.partition("@")
    return repo, (revision or None) if sep else None


def is_repo_id(text: str) -> bool:
    """True for "org/name" or "org/name@revision" (names checked by huggingface_hub), unless it is a local path."""
    repo, revision = split_revision(text)
    if repo.count("/") != 1 or ("@" in text and revision is None) or Path(text).expanduser().exists():
        return False
    try:
        _hf().utils.validate_repo_id(repo)
    except ValueError:  # HFValidationError
        return False
    return True


def _check_repo_id(text: str) -> tuple[str, str | None]:
    if not is_repo_id(text):
        raise ParamError(f"{text!r} is not a Hugging Face repo id: expected org/name, e.g. "
                         f"microsoft/bitnet-b1.58-2B-4T, optionally with @revision")
    return split_revision(text)


# -- what a snapshot holds --------------------------------------------------------------------------------------

def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _magic(p) == b"GGUF")


def _is_hf_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def model_path(folder: Path) -> Path:
    """What to load from a downloaded or imported model: the directory when it is a Hugging Face checkpoint,
    else its GGUF file when it holds exactly one (GGUF repos ship a lone file), else the directory."""
    if not folder.is_dir() or _is_hf_checkpoint(folder):
        return folder
    ggufs = _gguf_files(folder)
    return ggufs[0] if len(ggufs) == 1 else folder


def _loadable(folder: Path) -> bool:
    """A snapshot that holds a whole model: every safetensors shard its index names, or a GGUF file."""
    if not folder.is_dir():
        return False
    if _gguf_files(folder):
        return True
    if not _is_hf_checkpoint(folder):
        return False
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return True
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all((folder / s).is_file() for s in shards)


# -- download and lookup ----------------------------------------------------------------------------------------

def _quiet_tqdm() -> type:
    """huggingface_hub's tqdm with every bar off (for progress=False)."""
    base = _hf().utils.tqdm

    class QuietTqdm(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


def pull(repo_id: str, revision: str | None = None, *, allow_patterns: list[str] | None = None,
         progress: bool = True) -> Path:
    """Download a model repo (or "org/name@revision") into the Hugging Face cache; return its snapshot directory.

    Only the files ternlm reads are fetched (DEFAULT_PATTERNS, or `allow_patterns`). Files already in the cache
    are not fetched again, so running pull after an interruption continues where it stopped. With
    HF_HUB_OFFLINE=1 nothing goes to the network: the cached snapshot is returned when it is complete.
    """
    repo, at_revision = _check_repo_id(repo_id)
    revision = revision or at_revision
    patterns = list(allow_patterns) if allow_patterns else list(DEFAULT_PATTERNS)
    hf, cache, no_network = _hf(), cache_dir(), offline()
    errors = hf.errors
    name = f"{repo}@{revision}" if revision else repo
    try:
        folder = hf.snapshot_download(repo, revision=revision, cache_dir=str(cache), allow_patterns=patterns,
                                      local_files_only=no_network, tqdm_class=None if progress else _quiet_tqdm())
    except errors.GatedRepoError as e:
        raise TernlmError(f"{name} is gated: accept its terms on huggingface.co, then log in (`hf auth login`) or "
                          f"set HF_TOKEN") from e
    except errors.RepositoryNotFoundError as e:
        raise ParamError(f"{name}: no such model repository on the Hugging Face Hub (or it is private and no "
                         f"token with access was given: set HF_TOKEN)") from e
    except errors.RevisionNotFoundError as e:
        raise ParamError(f"{name}: the repository has no revision {revision!r}") from e
    except getattr(errors, "IncompleteSnapshotError", ()) as e:
        why = "offline mode is on (HF_HUB_OFFLINE)" if no_network else "the Hugging Face Hub cannot be reached"
        raise TernlmError(f"{name}: the cached copy in {cache} is incomplete and {why}; run `ternlm pull {name}` "
                          f"with the Hub reachable to finish it") from e
    except errors.LocalEntryNotFoundError as e:
        if no_network or isinstance(e.__cause__, errors.OfflineModeIsEnabled):
            raise TernlmError(f"{name} is not in the Hugging Face cache ({cache}) and offline mode is on "
                              f"(HF_HUB_OFFLINE): pull it where the Hub is reachable, or bring it with "
                              f"`ternlm export` / `ternlm import`") from e
        raise TernlmError(f"cannot reach the Hugging Face Hub to download {name} ({e.__cause__ or e}); check the "
                          f"connection and run pull again: files already downloaded are kept") from e
    except errors.HfHubHTTPError as e:
        raise TernlmError(f"downloading {name} failed: {e}") from e
    except ValueError as e:  # HFValidationError and bad arguments
        raise ParamError(f"{name}: {e}") from e
    except OSError as e:  # disk full, permissions
        raise TernlmError(f"downloading {name} into {cache} failed: {e}") from e
    snapshot = Path(folder)
    if not snapshot.is_dir() or not any(snapshot.iterdir()):
        raise TernlmError(f"{name} holds no files matching {patterns}: nothing ternlm can load was downloaded")
    return snapshot


def _cached_snapshot(text: str) -> Path:
    """The snapshot directory of a cached "org/name[@revision]", without any network access."""
    repo, revision = split_revision(text)
    hf = _hf()
    errors = hf.errors
    not_cached = (f"{text} is neither a local path nor a model in the Hugging Face cache ({cache_dir()}); "
                  f"run `ternlm pull {text}`")
    try:
        return Path(hf.snapshot_download(repo, revision=revision, cache_dir=str(cache_dir()),
                                         allow_patterns=list(DEFAULT_PATTERNS), local_files_only=True))
    except getattr(errors, "IncompleteSnapshotError", ()) as e:
        folder = Path(e.snapshot_path)
        if _loadable(folder):  # pulled with narrower patterns than ours, e.g. one GGUF of several
            return folder
        raise ParamError(f"{text}: the cached copy in {folder} is incomplete; run `ternlm pull {text}` to finish "
                         f"the download") from e
    except (errors.LocalEntryNotFoundError, ValueError) as e:
        raise ParamError(not_cached) from e


def resolve(model: str | Path | None) -> Path | None:
    """What a MODEL argument names: None stays None (the shipped default model); an existing file or directory
    is itself; "org/name" or "org/name@revision" is its snapshot in the Hugging Face cache (for a GGUF repo,
    its single GGUF file). Never touches the network; anything else is a ParamError."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if not is_repo_id(text):
        raise ParamError(f"{text} is neither a local path nor a model in the Hugging Face cache (no such file or "
                         f"directory, and not a hub repo id like microsoft/bitnet-b1.58-2B-4T)")
    return model_path(_cached_snapshot(text))


# -- the local cache --------------------------------------------------------------------------------------------

def _scan() -> Any:
    hf = _hf()
    try:
        return hf.scan_cache_dir(cache_dir())
    except hf.errors.CacheNotFound:
        return None


def list_models() -> list[LocalModel]:
    """Every cached revision of every model repo in the Hugging Face cache, by repo id, newest first."""
    info = _scan()
    if info is None:
        return []
    found = [LocalModel(repo_id=repo.repo_id, revision=",".join(sorted(rev.refs)) or rev.commit_hash,
                        path=model_path(rev.snapshot_path), size_bytes=rev.size_on_disk,
                        last_modified=rev.last_modified, commit=rev.commit_hash)
             for repo in info.repos if repo.repo_type == "model" for rev in repo.revisions]
    return sorted(found, key=lambda m: (m.repo_id.lower(), -m.last_modified))


def remove(repo_id: str) -> int:
    """Delete every cached revision of a model repo ("org/name@revision": only that one); return bytes freed."""
    repo_name, revision = _check_repo_id(repo_id)
    info = _scan()
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == repo_name), None) if info else None
    if repo is None:
        raise ParamError(f"{repo_name} is not in the Hugging Face cache ({cache_dir()}); `ternlm list` shows what is")
    revisions = [r for r in repo.revisions if revision is None or revision == r.commit_hash or revision in r.refs]
    if not revisions:
        raise ParamError(f"{repo_name} has no cached revision {revision!r}; cached: "
                         f"{', '.join(','.join(sorted(r.refs)) or r.commit_hash for r in repo.revisions)}")
    # delete_revisions matches commit hashes across the whole cache: scope it to this repo.
    strategy = replace(info, repos=frozenset({repo})).delete_revisions(*(r.commit_hash for r in revisions))
    strategy.execute()
    return int(strategy.expected_freed_size)


# -- export / import ----------------------------------------------------------------------------------------------

class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through, so the archive's sha256 needs no second read."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        return self.f.write(b)


class _HashingReader(io.RawIOBase):
    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b


def _files_of(folder: Path) -> Iterator[tuple[Path, str]]:
    """Regular files under `folder` (following the cache's symlinks to blobs) and their relative posix names,
    sorted, leaving out hidden entries (.cache/ of local_dir downloads, .gitattributes)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                yield path, path.relative_to(folder).as_posix()


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def export_model(model: str | Path, out: str | Path) -> Path:
    """Write a model (local directory or file, or a cached repo id) to one uncompressed tar for air-gapped
    transfer, with a manifest of every member's sha256 inside and the tar's own sha256 in OUT.sha256 beside it
    (sha256sum format). `out` may be an existing directory: the file is then <name>.tar in it. Returns the tar."""
    if model is None:
        raise ParamError("name the model to export: a directory, a model file, or a cached repo id")
    path = Path(model).expanduser()
    if path.exists():
        source: dict[str, str] = {"path": path.resolve().name}
        root = path.resolve().name
    else:
        text = str(model)
        if not is_repo_id(text):
            raise ParamError(f"{text}: no such file or directory, and not a hub repo id like org/name")
        path = _cached_snapshot(text)
        source = {"repo_id": split_revision(text)[0], "commit": path.name}
        root = split_revision(text)[0].replace("/", "--")
    members = [(path, root)] if path.is_file() else [(p, f"{root}/{rel}") for p, rel in _files_of(path)]
    if not members:
        raise ParamError(f"{path}: no files to export")
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{root}.tar"
    entries = []
    with replacing(out) as tmp, open(tmp, "wb") as raw:
        writer = _HashingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for file, name in members:
                info = tarfile.TarInfo(name)
                st = file.stat()
                info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
                with open(file, "rb") as f:
                    reader = _HashingReader(f)
                    tar.addfile(info, reader)
                entries.append({"name": name, "size": reader.size, "sha256": reader.sha.hexdigest()})
            manifest = json.dumps({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "root": root,
                                   "kind": "file" if path.is_file() else "directory", "source": source,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "files": entries}, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(manifest), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(manifest))
        raw.flush()
        os.fsync(raw.fileno())
    with replacing(out.with_name(out.name + ".sha256")) as tmp:
        tmp.write_text(f"{writer.sha.hexdigest()}  {out.name}\n")
    return out


def _safe_name(archive: Path, name: str) -> PurePosixPath:
    """A member name as a relative path that stays inside the extraction directory, or FormatError."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or "\\" in name or any(p in ("..", ".", "") for p in name.split("/")):
        raise FormatError(f"{archive}: member {name!r} has an unsafe path (absolute, '..' or empty parts); refused")
    return rel


def _read_manifest(archive: Path, tar: tarfile.TarFile) -> dict:
    try:
        f = tar.extractfile(MANIFEST)
        manifest = json.loads(f.read()) if f else None
    except KeyError:
        raise FormatError(f"{archive}: no {MANIFEST}; not a `ternlm export` archive") from None
    except ValueError as e:
        raise FormatError(f"{archive}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise FormatError(f"{archive}: {MANIFEST} is not a ternlm export manifest")
    if manifest.get("version") != EXPORT_VERSION:
        raise FormatError(f"{archive}: export version {manifest.get('version')!r}; this ternlm reads version "
                          f"{EXPORT_VERSION}")
    files, root = manifest.get("files"), manifest.get("root")
    if (not isinstance(root, str) or not isinstance(files, list)
            or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("size"), int)
                       and isinstance(e.get("sha256"), str) for e in files)):
        raise FormatError(f"{archive}: {MANIFEST} lacks root or a valid files list")
    if len(_safe_name(archive, root).parts) != 1:
        raise FormatError(f"{archive}: manifest root {root!r} must be a single name")
    return manifest


def verify_archive(archive: str | Path) -> None:
    """Check an export against the OUT.sha256 beside it; FormatError on a mismatch. No sidecar: nothing to do
    (import still checks every member against the manifest)."""
    archive = Path(archive)
    sidecar = archive.with_name(archive.name + ".sha256")
    if not sidecar.is_file():
        return
    fields = sidecar.read_text().split()
    if not fields or len(fields[0]) != 64:
        raise FormatError(f"{sidecar}: not a sha256sum line")
    got = _sha256_file(archive)
    if got != fields[0].lower():
        raise FormatError(f"{archive}: sha256 {got} does not match {sidecar} ({fields[0]}); the archive is "
                          f"damaged or was changed")


def import_model(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Unpack a `ternlm export` archive after checking it: the tar against OUT.sha256 (when beside it), every
    member against the manifest, and no member path leaving the destination (links are refused outright).
    dest is the model's new path (default $TERNLM_HOME/models/<name>) and must not exist yet. Returns the path to
    load: the directory, or the GGUF file inside it when it is a lone GGUF."""
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise ParamError(f"{archive}: no such file")
    verify_archive(archive)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            return model_path(_unpack(archive, tar, dest))
    except tarfile.TarError as e:
        raise FormatError(f"{archive}: not a readable uncompressed tar archive ({e})") from e


def _unpack(archive: Path, tar: tarfile.TarFile, dest: str | Path | None) -> Path:
    """Check the members against the manifest, then extract them through a staging directory to dest."""
    manifest = _read_manifest(archive, tar)
    root = manifest["root"]
    expected = {e["name"]: e for e in manifest["files"]}
    seen: set[str] = set()
    for m in tar.getmembers():
        rel = _safe_name(archive, m.name)
        if m.issym() or m.islnk():
            raise FormatError(f"{archive}: member {m.name!r} is a link (to {m.linkname!r}); refused")
        if m.name == MANIFEST or (m.isdir() and (m.name == root or m.name.startswith(root + "/"))):
            continue
        if not m.isfile() or rel.parts[0] != root or m.name not in expected or m.name in seen:
            raise FormatError(f"{archive}: member {m.name!r} is not a file listed once in the manifest")
        seen.add(m.name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise FormatError(f"{archive}: members missing from the archive: {', '.join(missing)}")
    if dest is None:
        dest = home() / "models" / root
    dest = Path(dest).expanduser()
    if dest.exists():
        raise ParamError(f"{dest} already exists; remove it or import to another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = _atomic_target(dest)
    try:
        _extract(archive, tar, expected, staging, root)
        os.replace(staging / root, dest)
    except OSError as e:  # disk full, permissions, a file and a directory of the same name
        raise TernlmError(f"importing {archive} into {dest} failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _extract(archive: Path, tar: tarfile.TarFile, expected: dict[str, dict], staging: Path, root: str) -> None:
    """Stream each listed member into `staging`, hashing as it goes; FormatError naming the first bad one."""
    (staging / root).parent.mkdir(parents=True, exist_ok=True)
    for name, entry in expected.items():
        member = tar.getmember(name)
        if member.size != entry["size"]:
            raise FormatError(f"{archive}: member {name} is {member.size} bytes, the manifest says {entry['size']}")
        target = staging.joinpath(*PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        if src is None:
            raise FormatError(f"{archive}: member {name} cannot be read")
        sha = hashlib.sha256()
        with src, open(target, "wb") as f:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                f.write(chunk)
        if sha.hexdigest() != entry["sha256"].lower():
            raise FormatError(f"{archive}: member {name} has sha256 {sha.hexdigest()}, the manifest says "
                              f"{entry['sha256']}; the archive is damaged or was changed")
        os.utime(target, (member.mtime, member.mtime))
