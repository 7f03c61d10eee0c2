"""Where an experiment lives, and the only ways sweeper writes there.

`storage` is a local (possibly shared) path or a URI of any `pyarrow.fs` filesystem:
`s3://bucket/prefix` and `gs://bucket/prefix` with each cloud's standard credentials and
settings (for S3 the `AWS_*` variables, `AWS_ENDPOINT_URL` included, which is how MinIO or
Ceph are reached), `hdfs://`, or any fsspec protocol; the spec key `storage_filesystem`
(`{type: s3, endpoint_override: ..., region: ...}`) builds the filesystem from options
instead. A `Location` is one folder there.

Every write is a whole file: on a local disk a temporary file, fsync and `os.replace`; on
an object store one object, which readers see whole or not at all (an upload killed half
way leaves the previous object). Nothing is ever appended in place on an object store:
a trial keeps its files on node-local disk and uploads each one whole (`sink.TrialSink`).

Object stores hold no caches: stores that trials memory-map live in a node-local mirror
(`mirror_dir`), filled from the bucket (`pull_dir`) when another node built them
(`publish_dir`). Never imports Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from sweeper.spec import SpecError

URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# `storage_filesystem.type` -> the pyarrow filesystem built from the other keys.
FILESYSTEMS = {"s3": "S3FileSystem", "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem",
               "local": "LocalFileSystem"}


# --------------------------------------------------------------------------- local files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:  # name the file (disk full, quota)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_json(value: Any) -> Any:
    """JSON has no NaN/inf; store them as null so every reader parses the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def json_bytes(obj: Any) -> bytes:
    """`obj` as indented, key-sorted JSON (NaN/inf as null)."""
    return (json.dumps(clean_json(obj), indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    atomic_write_bytes(path, json_bytes(obj))


def parse_json(data: bytes | str | None) -> Any | None:
    """The JSON in `data`, or None when it is missing or not JSON."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`, or None when the file is missing or unreadable."""
    try:
        return parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of `path`; a torn line (a killed writer) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return parse_jsonl(text)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """Complete JSON object lines of `text`; a torn or foreign line is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """A folder or file on a filesystem: a local path (`fs` None) or a path on a pyarrow
    filesystem (`fs_path` without the scheme, as pyarrow and Ray Train take it). Pickles
    with its filesystem (never with credentials from the environment), so Ray tasks on
    other nodes reach the same place with their own credentials."""

    fs: pafs.FileSystem | None
    fs_path: str
    scheme: str = ""

    @property
    def remote(self) -> bool:
        return self.fs is not None

    @property
    def local(self) -> Path | None:
        """The local path, or None on a remote filesystem."""
        return None if self.fs is not None else Path(self.fs_path)

    @property
    def name(self) -> str:
        return self.fs_path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.fs_path.rstrip("/").rsplit("/", 1)[0] or "/",
                        self.scheme)

    def __truediv__(self, part: str) -> Location:
        return Location(self.fs, f"{self.fs_path.rstrip('/')}/{part}", self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.fs_path}" if self.fs is not None else self.fs_path

    def __fspath__(self) -> str:
        if self.fs is not None:
            raise TypeError(f"{self} is not a local path")
        return self.fs_path

    def _info(self) -> pafs.FileInfo:
        assert self.fs is not None
        return self.fs.get_file_info(self.fs_path)

    def is_file(self) -> bool:
        if self.fs is None:
            return Path(self.fs_path).is_file()
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        if self.fs is None:
            return Path(self.fs_path).is_dir()
        return self._info().type == pafs.FileType.Directory

    def exists(self) -> bool:
        if self.fs is None:
            return Path(self.fs_path).exists()
        return self._info().type != pafs.FileType.NotFound

    def children(self) -> list[str]:
        """Names of the files and folders in this folder ([] when it does not exist)."""
        if self.fs is None:
            p = Path(self.fs_path)
            return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        sel = pafs.FileSelector(self.fs_path, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def read_bytes(self) -> bytes | None:
        """The file's bytes, or None when it does not exist or cannot be read."""
        try:
            if self.fs is None:
                return Path(self.fs_path).read_bytes()
            with self.fs.open_input_stream(self.fs_path) as f:
                return f.read()
        except (OSError, ValueError):
            return None

    def read_json(self) -> Any | None:
        return parse_json(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with `data`, whole (see the module docstring)."""
        if self.fs is None:
            atomic_write_bytes(self.fs_path, data)
            return
        # One write of bytes in memory: S3/GCS make the object visible only when the
        # stream closes, so a killed upload leaves the previous object.
        with self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json_bytes(obj))

    def mkdir(self) -> None:
        if self.fs is None:
            Path(self.fs_path).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.fs_path)

    def delete(self) -> None:
        """Remove the file or folder; nothing when it does not exist."""
        if self.fs is None:
            p = Path(self.fs_path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            return
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.fs_path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.fs_path)

    def upload(self, local: Path) -> None:
        """Copy the local file `local` to this location (streamed, one object)."""
        if self.fs is None:
            atomic_write_bytes(self.fs_path, Path(local).read_bytes())
            return
        # Ray Train copies with use_threads=False to S3 (apache/arrow#32372).
        pafs.copy_files(str(local), self.fs_path, destination_filesystem=self.fs,
                        use_threads=not isinstance(self.fs, pafs.S3FileSystem),
                        chunk_size=64 * 2**20)

    def download(self, local: Path) -> None:
        """Copy this folder (or file) to the local path `local`."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        fs = self.fs or pafs.LocalFileSystem()
        pafs.copy_files(self.fs_path, str(local), source_filesystem=fs,
                        chunk_size=64 * 2**20)


def is_uri(storage: str | Path) -> bool:
    """True for `scheme://...` (other than file://), false for local paths."""
    m = URI.match(str(storage))
    return bool(m) and m.group(1).lower() != "file"


def _local_path(storage: str) -> Path:
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    return Path(storage).expanduser().resolve()


def filesystem_options(options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(`type`, the other keys) of a `storage_filesystem` mapping."""
    opts = dict(options or {})
    return str(opts.pop("type", "")), opts


def _build_filesystem(storage: str, options: Mapping[str, Any],
                      key: str = "storage_filesystem") -> tuple[pafs.FileSystem, str]:
    kind, opts = filesystem_options(options)
    m = URI.match(storage)
    path = storage[m.end():] if m else storage
    if kind == "fsspec":
        import fsspec

        protocol = opts.pop("protocol", None) or (m.group(1) if m else None)
        if not protocol:
            raise SpecError(f"{key}.protocol: an fsspec filesystem needs its protocol (or a "
                            "URI that names it)")
        try:
            fs = fsspec.filesystem(protocol, **opts)
        except (ImportError, ValueError, TypeError) as e:
            raise SpecError(f"{key}: fsspec {protocol!r}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            ) from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(storage)
    if kind not in FILESYSTEMS:
        raise SpecError(f"{key}.type: {kind!r} is not one of "
                        f"{', '.join([*FILESYSTEMS, 'fsspec'])}")
    if kind == "s3":
        # pyarrow reads AWS_ENDPOINT_URL for URIs but not for S3FileSystem(...) itself.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_override" not in opts:
            opts["endpoint_override"] = endpoint
    try:
        fs = getattr(pafs, FILESYSTEMS[kind])(**opts)
    except (TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        bad = re.search(r"keyword argument '(\w+)'", msg)
        raise SpecError(f"{key}.{bad.group(1) if bad else 'type'}: {msg}") from None
    except OSError as e:  # HDFS: no libhdfs on this machine
        raise SpecError(f"{key}: {kind}: {str(e).splitlines()[0]}") from None
    return fs, (str(_local_path(path)) if kind == "local" else path.rstrip("/"))


def resolve(storage: str | Path, options: Mapping[str, Any] | None = None,
            keys: tuple[str, str] = ("storage", "storage_filesystem")) -> Location:
    """The Location of `storage` (a path or URI) on the filesystem `options` describes
    (`storage_filesystem`), or the one pyarrow resolves from the URI (reading the cloud's
    settings and credentials from the environment as it is now). Raises SpecError (one
    line starting with the spec key of `keys`: the URI's, the options') for an unknown
    scheme or bad options."""
    storage = str(storage)
    if options:
        fs, path = _build_filesystem(storage, options, keys[1])
        kind = options.get("type")
        if kind == "local":
            return Location(None, path)
        m = URI.match(storage)
        return Location(fs, path, m.group(1) if m else str(kind))
    if not is_uri(storage):
        return Location(None, str(_local_path(storage)))
    scheme = URI.match(storage).group(1)  # type: ignore[union-attr]
    try:
        fs, path = pafs.FileSystem.from_uri(storage)
    except OSError as e:  # S3 region lookup of a bucket that cannot be reached
        raise SpecError(f"{keys[0]}: {storage!r}: {_cause(e)}") from None
    except Exception:  # pyarrow does not know the scheme: perhaps fsspec does
        try:
            import fsspec

            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError):
            raise SpecError(
                f"{keys[0]}: {storage!r}: no pyarrow or fsspec filesystem for {scheme}:// "
                f"(use a local path, s3://, gs://, hdfs://, or set {keys[1]})"
            ) from None
        fs, path = _build_filesystem(storage, {"type": "fsspec", "protocol": scheme}, keys[1])
    return Location(fs, path.rstrip("/"), scheme)


# --------------------------------------------------------------------------- preflight

_CAUSES = (  # what the AWS/GCS errors that pyarrow passes on mean, in the user's words
    (r"NETWORK_CONNECTION|Could not (connect|resolve)|curlCode|Connection refused|timed out",
     "cannot reach the endpoint"),
    (r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|"
     r"SignatureDoesNotMatch|No credentials|credentials|ExpiredToken|UNAUTHENTICATED",
     "the credentials were refused (AWS_ACCESS_KEY_ID and "
     "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role; for gs:// "
     "GOOGLE_APPLICATION_CREDENTIALS)"),
    (r"ACCESS_DENIED|AccessDenied|Forbidden|PERMISSION_DENIED",
     "access denied: these credentials may not use it"),
    (r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist", "the bucket does not exist"),
    # What the AWS SDK reports when its provider chain found no credentials at all.
    (r"INTERNAL_FAILURE during \w+ operation: ?$",
     "no credentials were found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
     "AWS_PROFILE, or give the node an instance role)"),
)


def explain_error(e: BaseException) -> str:
    """What an error of a cloud filesystem means, in the user's words, with its text."""
    return _cause(e)


def _cause(e: BaseException) -> str:
    text = " ".join(str(e).split())
    for pattern, meaning in _CAUSES:
        if re.search(pattern, text):
            return f"{meaning} ({text[:200]})"
    return text[:300] or type(e).__name__


def check_remote(root: Location, label: str) -> None:
    """Refuse a remote storage that cannot be reached, whose credentials are missing or
    refused, or where they may not write: one line naming `label` (the URI) and the
    cause. Lists it (a listing's error names its cause, a HEAD's cannot), then writes one
    small object and deletes it again."""
    assert root.fs is not None
    try:
        root.fs.get_file_info(pafs.FileSelector(root.fs_path, allow_not_found=True))
    except OSError as e:
        raise SpecError(f"storage: {label!r}: {_cause(e)}") from None
    if root.is_file():
        raise SpecError(f"storage: {label!r} is a file, not a folder")
    probe = root / f".sweeper-write-check-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"ok")
    except OSError as e:
        raise SpecError(f"storage: {label!r}: cannot write there: {_cause(e)}") from None
    with contextlib.suppress(OSError):  # a bucket may allow writes but no deletes
        probe.delete()


# --------------------------------------------------------------------------- local mirrors


def mirror_dir(location: Location, cache_dir: str | Path | None = None) -> Path:
    """The node-local folder that mirrors `location`: the path itself for local storage,
    else `<cache_dir>/storage/<scheme>/<bucket>/<key>` (cache_dir: `--cache-dir`,
    $SWEEPER_CACHE or ~/.cache/sweeper) where a trial keeps its working copy and the
    caches that trials memory-map live."""
    if location.local is not None:
        return location.local
    from sweeper.synthetic import default_cache_dir

    base = Path(cache_dir) if cache_dir else default_cache_dir()
    parts = [p for p in location.fs_path.split("/") if p not in ("", ".", "..")]
    if not parts:  # pragma: no cover - a bucket root has its bucket name
        parts = [hashlib.sha256(str(location).encode()).hexdigest()[:12]]
    return base.expanduser().resolve() / "storage" / (location.scheme or "fs") / Path(*parts)


def publish_dir(local: Path, remote: Location, marker: str) -> None:
    """Upload the folder `local` to `remote`, the file `marker` last: whoever sees the
    marker in the bucket sees every file (`pull_dir` checks it)."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for f in sorted(files, key=lambda p: p.name == marker and p.parent == Path(local)):
        (remote / f.relative_to(local).as_posix()).upload(f)


def pull_dir(remote: Location, local: Path, marker: str) -> bool:
    """Copy a folder `publish_dir` uploaded into the local path `local` (through a
    temporary folder renamed into place); False when the bucket holds no complete copy."""
    if not (remote / marker).is_file():
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}.pull"))
    try:
        remote.download(tmp)
        if not (tmp / marker).is_file():
            return False
        try:
            os.replace(tmp, local)
        except OSError:  # another process put it there first
            if not (local / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
