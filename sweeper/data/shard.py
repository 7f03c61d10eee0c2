"""Write a dataset as WebDataset shards: `python -m sweeper.data.shard ROOT OUT`.

ROOT is any dataset sweeper reads (an ImageNet-style folder by default, `--format` for the
others; local or a URI), with its class names and captions (`--class-names`,
`--captions`, as `data.class_names` / `data.captions`). OUT (a folder or a bucket URI)
receives, per split, `OUT/<split>/<split>-000000.tar`, ... of at most `--maxcount` samples
and about `--maxsize` MB each, the samples in a seeded random order (a shard then holds
every class, not one), and `OUT/classes.json` (the class table, index -> [wnid, name]).
Each sample is `<key>.<image extension>` (the original bytes; formats a WebDataset
reader does not know are re-encoded as PNG), `<key>.cls` (the class index in
classes.json), and its captions: `<key>.txt` for one, `<key>.json` (`{"captions": [...]}`)
for several. Point a spec at it with `data: {root: OUT, format: webdataset,
class_names: classes.json}`.

The output is a function of the input and `--seed` (member times and owners are fixed),
each shard written whole (a temporary file renamed, or one object in a bucket).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from sweeper.data.base import DataError, Sample
from sweeper.data.formats.webdataset import IMAGE_MEMBERS
from sweeper.data.source import open_dataset
from sweeper.spec import SpecError
from sweeper.storage import resolve

log = logging.getLogger(__name__)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _image_member(raw: bytes, source: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image member: the original bytes when a WebDataset reader
    knows the extension, else the image re-encoded as PNG."""
    ext = os.path.splitext(source)[1].lower().lstrip(".")
    if ext in IMAGE_MEMBERS:
        return ext, raw
    out = io.BytesIO()
    with Image.open(io.BytesIO(raw)) as im:
        im.save(out, "PNG")
    return "png", out.getvalue()


class _ShardWriter:
    """Shards `<split>-000000.tar`, ... in `out` (a Location), each written whole."""

    def __init__(self, out: Any, split: str, maxcount: int, maxsize: int) -> None:
        self.out, self.split, self.maxcount, self.maxsize = out, split, maxcount, maxsize
        self.n_shards, self.count, self.size = 0, 0, 0
        self.tar: tarfile.TarFile | None = None
        self.file: BinaryIO | None = None
        self.tmp: str | None = None

    def _open(self) -> None:
        name = f"{self.split}-{self.n_shards:06d}.tar"
        loc = self.out / self.split / name
        if loc.fs is None:
            Path(loc.fs_path).parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=Path(loc.fs_path).parent, prefix=f".{name}.")
            self.file = os.fdopen(fd, "wb")
        else:
            self.file = loc.fs.open_output_stream(loc.fs_path)
        self.target = loc
        self.tar = tarfile.open(fileobj=self.file, mode="w|",  # noqa: SIM115 (closed in close)
                                format=tarfile.USTAR_FORMAT)
        self.n_shards += 1
        self.count = self.size = 0

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()  # type: ignore[union-attr]
        if self.tmp is not None:
            os.chmod(self.tmp, 0o644)  # (mkstemp's 0600: others read datasets)
            os.replace(self.tmp, self.target.fs_path)
            self.tmp = None
        self.tar = self.file = None

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        nbytes = sum(len(d) + 1024 for _, d in members)
        if self.tar is not None and (self.count >= self.maxcount
                                     or self.size + nbytes > self.maxsize):
            self.close()
        if self.tar is None:
            self._open()
        for ext, data in members:
            _member(self.tar, f"{key}.{ext}", data)  # type: ignore[arg-type]
        self.count += 1
        self.size += nbytes


def write_shards(root: str | Path, out: str | Path, fmt: str = "folder",
                 class_names: str | None = None, captions: str | None = None,
                 maxcount: int = 10_000, maxsize_mb: float = 1000.0, seed: int = 0,
                 splits: tuple[str, ...] = ("train", "val")) -> dict[str, int]:
    """Write the dataset at `root` as WebDataset shards under `out` (see the module
    docstring); returns the number of shards per split. Unreadable images are left out
    (and counted in a warning)."""
    ds = open_dataset(root, fmt, class_names, captions)
    ds.check_root()
    reader = ds.reader()
    dest = resolve(str(out))
    written: dict[str, int] = {}
    classes: dict[str, tuple[int, str]] = {}  # wnid -> (index in classes.json, name)
    for split in splits:
        sp = ds.split(split)
        for w, name in zip(sp.wnids, sp.names, strict=True):  # the first split's order
            classes.setdefault(w, (len(classes), name))
        label = [classes[w][0] for w in sp.wnids]
        order = list(range(len(sp.samples)))
        random.Random(f"{seed}/{split}").shuffle(order)
        writer, bad = _ShardWriter(dest, split, maxcount, int(maxsize_mb * 2**20)), 0
        try:
            for n, (_, raw) in enumerate(reader.stream([sp.samples[i] for i in order])):
                s: Sample = sp.samples[order[n]]
                try:
                    if raw is None:
                        raise OSError("unreadable")
                    ext, data = _image_member(raw, s.path)
                except OSError:
                    bad += 1
                    continue
                members = [(ext, data), ("cls", str(label[s.label]).encode())]
                if len(s.captions) == 1:
                    members.append(("txt", s.captions[0].encode()))
                elif s.captions:
                    members.append(("json", json.dumps({"captions": list(s.captions)}).encode()))
                writer.write(f"{split}_{n:08d}", members)
        finally:
            writer.close()
        if bad:
            log.warning("%s: %d unreadable image(s) left out", split, bad)
        written[split] = writer.n_shards
    table = {str(i): [w, name] for w, (i, name) in classes.items()}
    (dest / "classes.json").write_bytes(json.dumps(table, indent=1).encode())
    return written


def main(argv: list[str] | None = None) -> int:
    """The command line (exit 2 on bad input, naming the file or key)."""
    ap = argparse.ArgumentParser(prog="python -m sweeper.data.shard",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the dataset to shard (a folder or a URI)")
    ap.add_argument("out", help="where the shards go (a folder or a URI)")
    ap.add_argument("--format", default="folder", help="ROOT's data.format (folder)")
    ap.add_argument("--class-names", help="as data.class_names")
    ap.add_argument("--captions", help="as data.captions")
    ap.add_argument("--maxcount", type=int, default=10_000, help="samples per shard at most")
    ap.add_argument("--maxsize", type=float, default=1000.0, help="MB per shard, about")
    ap.add_argument("--seed", type=int, default=0, help="of the samples' order")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        n = write_shards(args.root, args.out, args.format, args.class_names, args.captions,
                         args.maxcount, args.maxsize, args.seed)
    except (DataError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {k} shard(s)" for split, k in n.items()) + f" in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
