"""`data.format: webdataset`: tar shards in the WebDataset layout (what `img2dataset` and
`sweeper.data.shard` write, what open_clip trains from).

Shards: `train/*.tar` and `val/*.tar` under the root, or the brace-expanded lists
`data.train_shards` / `data.val_shards` relative to it (open_clip's notation,
`"train-{000000..000127}.tar"`). A sample is the run of members that share a key (the
member name up to the first dot of its base name): an image (`.jpg`, `.jpeg`, `.png`,
`.webp`), an optional caption (`.txt`), and a label, `.cls` (an integer: the index into
`data.class_names`) or `.json` with `label` (an integer, or a wnid named in
`data.class_names`); a `.json` may also carry `caption` or `captions`.

Shards are untrusted input and are only ever read, never extracted: member names are keys,
never paths on disk; a member over `data.max_member_mb` is skipped (and counted) without
being read whole; extended headers (pax, GNU long names) over 1 MiB end the shard's read
as a corrupt one. A truncated or corrupt shard gives what can be read, the rest skipped and
counted, its name logged once.

Reading: a shard is read front to back, in ranged requests of `READ_CHUNK` bytes (never one
per image), from the first sample a reader needs to the last. Scanning a split reads each
shard once to index it (each sample's key, byte range, label and captions; never the image
bytes into memory) and keeps the index in the node's cache (`$SWEEPER_CACHE/wds-index/`),
keyed by the shard's URI, size and modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sweeper import synthetic
from sweeper.data.base import MAX_CAPTION_CHARS, DataError, DataSplit, Sample
from sweeper.data.formats.base import Entry, Files, Format, Reader
from sweeper.data.manifests import Captions, ClassTable, LabelNamer, captions_of

log = logging.getLogger(__name__)

IMAGE_MEMBERS = frozenset({"jpg", "jpeg", "png", "webp"})
META_MEMBERS = frozenset({"cls", "json", "txt"})
MAX_MEMBER_MB = 64.0  # default `data.max_member_mb`: a larger member is skipped, unread
MAX_META_BYTES = 1 << 20  # a larger .cls/.json/.txt member (or extended header) is not read
READ_CHUNK = 32 << 20  # bytes per ranged request; also the memory one open shard holds
MAX_SHARDS = 1_000_000  # a brace pattern expanding to more is refused
INDEX_THREADS = 8  # shards indexed at once
INDEX_VERSION = 1
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


# --------------------------------------------------------------------------- shard lists


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """open_clip's (bash's) brace notation: `a-{000..002}.tar` -> a-000.tar, a-001.tar,
    a-002.tar (zero padding kept), `{x,y}` -> x, y; several groups multiply. Refuses
    (ValueError) a pattern that expands to more than `limit` names."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        lo, hi = int(a), int(b)
        if hi < lo:
            raise ValueError(f"{{{body}}} counts down")
        if hi - lo + 1 > limit:
            raise ValueError(f"{{{body}}} names more than {limit} shards")
        width = len(a) if a.startswith("0") else 0
        parts = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        parts = body.split(",")
    out: list[str] = []
    for p in parts:
        for rest in expand_braces(head + p + tail, limit):
            out.append(rest)
            if len(out) > limit:
                raise ValueError(f"expands to more than {limit} shards")
    return out


def shard_entries(files: Files, split: str, spec: Any) -> list[Entry]:
    """The shards of a split, in order: `data.<split>_shards` brace-expanded relative to
    the root, or every `<root>/<split>/*.tar` in name order. Refuses a missing shard or a
    split without any (one line naming the URI)."""
    key = f"data.{split}_shards"
    pattern = getattr(spec, f"{split}_shards", None)
    if pattern:
        try:
            names = expand_braces(pattern)
        except ValueError as e:
            raise DataError(f"{key}: {pattern!r}: {e}") from None
        out = []
        for n in names:
            if n.startswith("/") or "://" in n or ".." in n.split("/"):
                raise DataError(f"{key}: shard {n!r} is not a path under data.root")
            e = files.stat(files.path(n))
            if e is None or e.is_dir:
                raise DataError(f"{files.uri(files.path(n))}: shard named by {key} not found")
            out.append(e)
        return out
    split_dir = files.path(split)
    e = files.stat(split_dir)
    if e is None or not e.is_dir:
        raise DataError(f"{files.uri(split_dir)}: missing split folder (or give {key})")
    out = [e for e in files.entries(split_dir)[0] if not e.is_dir and e.name.endswith(".tar")]
    if not out:
        raise DataError(f"{files.uri(split_dir)}: no .tar shards")
    return out


# --------------------------------------------------------------------------- reading tar


class _Ranged(io.RawIOBase):
    """Bytes [start, end) of a file, fetched in reads of at most `chunk` bytes (on a bucket
    each read is one ranged request)."""

    def __init__(self, f: Any, start: int, end: int, chunk: int) -> None:
        self.f, self.left, self.chunk = f, max(0, end - start), chunk
        if start:
            f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left, self.chunk)
        if n <= 0:
            return 0
        data = self.f.read(n)
        b[:len(data)] = data
        self.left -= len(data)
        return len(data)


class _BoundedInfo(tarfile.TarInfo):
    """A tar header that refuses extended headers (pax, GNU long names) over
    MAX_META_BYTES: tarfile would read them into memory whole."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > MAX_META_BYTES:
            raise tarfile.ReadError(f"an extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)


def _tar(f: Any, start: int, end: int, max_bytes: int) -> tarfile.TarFile:
    """Bytes [start, end) of an uncompressed tar as a stream of members (tarfile's `r|`
    mode: read front to back, nothing extracted); `start` is a member's header. No read
    holds more than READ_CHUNK or `max_bytes` (the member bound) of it: a member over the
    bound is never in memory whole, even while tarfile reads past it."""
    chunk = max(tarfile.RECORDSIZE, min(READ_CHUNK, max_bytes))
    buffered = io.BufferedReader(_Ranged(f, start, end, chunk), buffer_size=chunk)
    return tarfile.open(fileobj=buffered, mode="r|", tarinfo=_BoundedInfo,
                        bufsize=min(chunk, 1 << 20))


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset splits it: the key is everything up
    to the first dot of the base name; the extension the rest, lower-cased."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower() if dot else ""


def _kind(ext: str) -> str:
    return ext.rsplit(".", 1)[-1]


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# --------------------------------------------------------------------------- index


def _parse_meta(kind: str, data: bytes, rec: dict[str, Any]) -> None:
    text = data.decode("utf-8", errors="replace")
    if kind == "cls":
        with contextlib.suppress(ValueError):
            rec["label"] = int(text.strip())
    elif kind == "txt":
        if text.strip():
            rec["captions"].append(text.strip()[:MAX_CAPTION_CHARS])
    elif kind == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        label = obj.get("label")
        if rec.get("label") is None and isinstance(label, int | str) \
                and not isinstance(label, bool):
            rec["label"] = label
        caps = obj.get("captions", obj.get("caption"))
        for c in [caps] if isinstance(caps, str) else caps if isinstance(caps, list) else []:
            if isinstance(c, str) and c.strip():
                rec["captions"].append(c.strip()[:MAX_CAPTION_CHARS])


def index_shard(files: Files, shard: Entry, max_bytes: int = READ_CHUNK) -> dict[str, Any]:
    """Every sample of one shard: `samples` [[key, offset, bytes, image bytes (-1: no
    image), label (None: none), captions]], and `truncated` (why the shard ended early,
    or None). Reads the shard once, front to back, in reads of at most `max_bytes`;
    keeps only the small members."""
    samples: list[list[Any]] = []
    cur: dict[str, Any] | None = None

    def flush() -> None:
        if cur is not None:
            samples.append([cur["key"], cur["offset"], cur["end"] - cur["offset"],
                            cur["image"], cur.get("label"), cur["captions"]])

    truncated, cut, tar = None, 0, None
    try:
        with files.open(shard.path) as f, _tar(f, 0, shard.size, max_bytes) as tar:
            for m in tar:
                tar.members = []  # tarfile keeps every header it read: not ours
                if not m.isreg():
                    continue
                key, ext = _split_name(m.name)
                if cur is None or key != cur["key"]:
                    flush()
                    cur = {"key": key, "offset": m.offset, "image": -1, "captions": []}
                cur["end"] = m.offset_data + _padded(m.size)
                kind = _kind(ext)
                if kind in IMAGE_MEMBERS and cur["image"] < 0:
                    cur["image"] = m.size
                elif kind in META_MEMBERS and m.size <= MAX_META_BYTES:
                    fh = tar.extractfile(m)
                    if fh is not None:
                        _parse_meta(kind, fh.read(), cur)
            if shard.size - tar.offset < 2 * tarfile.BLOCKSIZE:
                truncated = "no end-of-archive marker"
    except (tarfile.TarError, EOFError) as e:
        truncated = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        # The sample being read is whole when the stream got past its last member (the
        # next header was cut or refused); else its members may be cut: dropped, counted.
        if cur is not None and (tar is None or tar.fileobj.tell() < tar.offset):
            cur, cut = None, 1
    except OSError as e:
        raise DataError(f"{files.uri(shard.path)}: cannot read shard ({e})") from None
    flush()
    return {"v": INDEX_VERSION, "samples": samples, "truncated": truncated, "cut": cut}


def _index_file(files: Files, shard: Entry) -> Path:
    key = hashlib.sha256(json.dumps([INDEX_VERSION, files.uri(shard.path), shard.size,
                                     shard.mtime_ns]).encode()).hexdigest()[:32]
    return synthetic.default_cache_dir() / "wds-index" / f"{key}.json"


def shard_index(files: Files, shard: Entry, max_bytes: int = READ_CHUNK) -> dict[str, Any]:
    """`index_shard`, kept in the node's cache (keyed by URI, size and mtime)."""
    path = _index_file(files, shard)
    try:
        doc = json.loads(path.read_text())
        if doc.get("v") == INDEX_VERSION:
            return doc
    except (OSError, ValueError):
        pass
    doc = index_shard(files, shard, max_bytes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".idx.")
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: index again next time
        log.debug("webdataset: cannot keep the index of %s: %s", shard.path, e)
    return doc


# --------------------------------------------------------------------------- scan


def scan_split(files: Files, split: str, table: ClassTable | None, captions: Captions,
               spec: Any) -> DataSplit:
    """The samples of a split's shards, in shard order then member order. Samples without
    an image, without a label, or whose image member is over `data.max_member_mb` are left
    out and counted (`DataSplit.skipped`)."""
    max_bytes = int(float(getattr(spec, "max_member_mb", MAX_MEMBER_MB)) * 2**20)
    namer = LabelNamer(table)
    rows: list[tuple[str, int, int, Any, tuple[str, ...]]] = []
    skipped = {"no image": 0, "no label": 0, "over max_member_mb": 0, "cut short": 0}
    shards = shard_entries(files, split, spec)
    # Shards not indexed on this node yet are read a few at a time (mostly waiting on I/O).
    with ThreadPoolExecutor(min(INDEX_THREADS, len(shards))) as pool:
        indexes = list(pool.map(lambda e: shard_index(files, e, max_bytes), shards))
    for shard, idx in zip(shards, indexes, strict=True):
        where = files.uri(shard.path)
        if idx["truncated"]:
            _warn_once(f"{where}", "%s: truncated or corrupt shard (%s): the samples before "
                       "the damage are used", where, idx["truncated"])
        skipped["cut short"] += idx.get("cut", 0)
        for key, offset, span, image, label, caps in idx["samples"]:
            if image < 0:
                skipped["no image"] += 1
            elif label is None or (isinstance(label, int) and label < 0):
                skipped["no label"] += 1
            elif image > max_bytes:
                skipped["over max_member_mb"] += 1
            else:
                k = namer.add(label, None, where)
                extra = captions_of(captions, key, posixpath.basename(key))
                rows.append((shard.path, offset, span, k, (*caps, *extra)))
    n_skipped = sum(skipped.values())
    if n_skipped:
        log.warning("%s: %d sample(s) left out (%s)", files.uri(files.path(split)), n_skipped,
                    ", ".join(f"{n} {why}" for why, n in skipped.items() if n))
    index, wnids, names = namer.labels(files.uri(files.path(split)))
    samples = [Sample(p, index[k], caps, (o, n)) for p, o, n, k, caps in rows]
    return DataSplit(samples, wnids, names, skipped=n_skipped)


class WebDatasetReader(Reader):
    """Streams the images of runs of samples out of their shards: per shard one read from
    the first sample wanted to the end of the last, in ranged requests of READ_CHUNK
    bytes."""

    streamed = True

    def __init__(self, files: Files, max_member_mb: float = MAX_MEMBER_MB) -> None:
        self.files = files
        self.max_bytes = int(max_member_mb * 2**20)

    def where(self, sample: Sample) -> str:
        return f"{self.files.uri(sample.path)}[byte {sample.at[0]}]"

    def stream(self, samples: Sequence[Sample]) -> Iterator[tuple[int, bytes | None]]:
        i = 0
        while i < len(samples):
            j = i
            while j < len(samples) and samples[j].path == samples[i].path:
                j += 1
            yield from self._run(samples[i:j], i)
            i = j

    def _run(self, run: Sequence[Sample], base: int) -> Iterator[tuple[int, bytes | None]]:
        """The samples of one shard, in increasing offset order."""
        start = run[0].at[0]
        end = max(s.at[0] + s.at[1] for s in run)
        k, image = 0, None
        shard = run[0].path
        try:
            with self.files.open(shard) as f, _tar(f, start, end, self.max_bytes) as tar:
                for m in tar:
                    tar.members = []
                    off = start + m.offset
                    while k < len(run) and off >= run[k].at[0] + run[k].at[1]:
                        yield base + k, image or None  # past the sample's members
                        k, image = k + 1, None
                    if k == len(run):
                        break
                    if off < run[k].at[0] or image is not None or not m.isreg() or \
                            _kind(_split_name(m.name)[1]) not in IMAGE_MEMBERS:
                        continue
                    if m.size > self.max_bytes:  # skipped unread: tarfile seeks past it
                        _warn_once(f"{shard}:{off}", "%s: image member %s of %d bytes over "
                                   "data.max_member_mb skipped", self.files.uri(shard),
                                   m.name[:200], m.size)
                        image = b""
                        continue
                    fh = tar.extractfile(m)
                    image = fh.read() if fh is not None else None
        except (tarfile.TarError, EOFError, OSError) as e:
            _warn_once(shard, "%s: truncated or corrupt shard (%s): %d sample(s) of it "
                       "skipped", self.files.uri(shard), str(e).splitlines()[0][:200]
                       if str(e) else type(e).__name__, len(run) - k)
        while k < len(run):
            yield base + k, image or None
            k, image = k + 1, None


class WebDatasetFormat(Format):
    name = "webdataset"
    keys = frozenset({"train_shards", "val_shards", "max_member_mb", "shuffle_buffer"})
    captions_inside = True

    def scan(self, files: Files, split: str, table: ClassTable | None, captions: Captions,
             spec: Any, only: set[str] | None = None) -> DataSplit:
        return scan_split(files, split, table, captions, spec)

    def split_files(self, files: Files, split: str, spec: Any) -> list[Entry]:
        return shard_entries(files, split, spec)

    def reader(self, files: Files, spec: Any) -> Reader:
        return WebDatasetReader(files, float(getattr(spec, "max_member_mb", MAX_MEMBER_MB)))


FORMAT = WebDatasetFormat()
