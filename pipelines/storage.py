"""Where data lives: a local path or a URI -> (pyarrow filesystem, path).

The one module that knows about schemes. Every data location of the pipeline (raw datasets,
shards, manifests, Ray Train storage, predictions) is a *location*: a local path
(``data/shards``), ``file:///abs/path``, ``s3://bucket/prefix``, or anything else
``pyarrow.fs.FileSystem.from_uri`` resolves (``gs://``, ``hdfs://``).

S3 settings come only from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION); credentials are never passed
explicitly, so a pickled filesystem (sent to a Ray worker) carries none: each node reads its
own environment. Errors name the location and the cause, never a secret (``redact``).

Object stores have no atomic rename: writers put a new version under its own prefix and the
one object readers follow (a manifest) last, with a single PUT.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.errors import UserError

# Schemes pyarrow resolves (FileSystem.from_uri) that we accept; "file" is local.
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_USERINFO = re.compile(r"(://[^/:@\s]+):[^@/\s]+@")


class StorageError(UserError, OSError):
    """A location that cannot be used (bad scheme, missing bucket, denied, unreachable); the
    message is one line naming the location and the cause, never a secret."""

    def __init__(self, message: str):
        super().__init__(message)
        # An endpoint that does not answer may answer later (Prefect retries it).
        self.transient = "does not answer" in message


class NotFound(UserError, FileNotFoundError):
    """A file or folder that does not exist (a user's input, or a location not written yet)."""


def redact(text: str) -> str:
    """``text`` with secret values from the environment and URI passwords masked."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1:***@", text)


def scheme(location: str | os.PathLike[str]) -> str | None:
    """The URI scheme of a location (``s3``), or None for a plain local path."""
    m = _URI.match(str(location))
    return m.group(1).lower() if m else None


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for an object store or remote file system (not a local path or file://)."""
    return scheme(location) not in (None, "file")


def normalize(location: str | os.PathLike[str]) -> str:
    """A canonical location string: local paths made absolute, URIs without a trailing /."""
    s = str(location)
    sch = scheme(s)
    if sch is None:
        return os.path.abspath(os.path.expanduser(s))
    if sch == "file":  # a file:// URI is percent-encoded (Path.as_uri of "été 1.png")
        from urllib.parse import unquote

        return os.path.abspath(unquote(s[len("file://"):]) or "/")
    if sch not in SCHEMES:
        raise StorageError(f"unsupported location {redact(s)}: scheme '{sch}://' is not one "
                           f"of {', '.join(x + '://' for x in SCHEMES)} or a local path")
    head, rest = s.split("://", 1)
    return f"{head.lower()}://{rest.rstrip('/')}" if rest.rstrip("/") else s


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/...`` for paths and URIs alike (parts use '/')."""
    base = normalize(location)
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not tail:
        return base
    return os.path.join(base, *tail.split("/")) if scheme(base) is None else f"{base}/{tail}"


def name(location: str | os.PathLike[str]) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | os.PathLike[str]) -> str:
    loc = normalize(location)
    if scheme(loc) is None:
        return os.path.dirname(loc)
    head, rest = loc.split("://", 1)
    return f"{head}://{rest.rsplit('/', 1)[0]}" if "/" in rest else loc


def _env_key() -> tuple[str | None, ...]:
    # Filesystems are cached per environment: a test (or a user) that changes the endpoint
    # or credentials gets a new client. The tuple stays in memory only.
    return tuple(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_SESSION_TOKEN"))


_FS_CACHE: dict[tuple[Any, ...], pafs.FileSystem] = {}


def s3_filesystem() -> pafs.S3FileSystem:
    """S3 from the standard variables. Buckets are never created implicitly: a typo in a
    bucket name is an error, not a new bucket."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                              "connect_timeout": 5.0, "request_timeout": 60.0,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if endpoint:
        sch, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=sch if host else "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(location: str | os.PathLike[str]) -> pafs.FileSystem:
    return resolve(location)[0]


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a location."""
    loc = normalize(location)
    sch = scheme(loc)
    if sch is None:
        key: tuple[Any, ...] = ("local",)
        if key not in _FS_CACHE:
            _FS_CACHE[key] = pafs.LocalFileSystem()
        return _FS_CACHE[key], loc
    rest = loc.split("://", 1)[1]
    if sch == "s3":
        key = ("s3", *_env_key())
        if key not in _FS_CACHE:
            _FS_CACHE[key] = s3_filesystem()
        return _FS_CACHE[key], rest
    key = (sch, rest.split("/", 1)[0], *_env_key())
    with _errors(loc, "open"):
        if key not in _FS_CACHE:
            _FS_CACHE[key] = pafs.FileSystem.from_uri(loc)[0]
        return _FS_CACHE[key], pafs.FileSystem.from_uri(loc)[1]


def location(fs: pafs.FileSystem, path: str, like: str | os.PathLike[str]) -> str:
    """The location of ``path`` inside ``fs`` (e.g. Ray's checkpoint.path), spelled like
    ``like``: a local path, or ``scheme://path``."""
    sch = scheme(normalize(like))
    if sch is None or isinstance(fs, pafs.LocalFileSystem):
        return os.path.abspath(path)
    return f"{sch}://{path.lstrip('/')}" if sch in ("s3", "gs", "gcs") else f"{sch}://{path}"


# ------------------------------------------------------------------------------ errors

_CAUSES = (
    (("NoSuchBucket", "bucket does not exist", "Bucket does not exist"),
     "the bucket does not exist"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "ACCESS_DENIED", "AccessDenied",
      "Access Denied", "403", "UNAUTHORIZED"),
     "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    (("curlCode: 7", "Couldn't connect", "Could not connect", "Connection refused",
      "Failed to connect", "NETWORK_CONNECTION", "curlCode: 28", "Timeout was reached",
      "curlCode: 6", "Couldn't resolve host"),
     "the S3 endpoint does not answer (AWS_ENDPOINT_URL={endpoint})"),
)


def explain(exc: BaseException, loc: str, action: str) -> str:
    """One line: what failed where, and why."""
    text = str(exc)
    for needles, cause in _CAUSES:
        if any(n in text for n in needles):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or "unset: AWS's own"
            return redact(f"cannot {action} {loc}: {cause.format(endpoint=endpoint)}")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return redact(f"cannot {action} {loc}: {first}")


@contextmanager
def _errors(loc: str, action: str) -> Iterator[None]:
    """pyarrow's errors -> FileNotFoundError / StorageError with one clean line."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise NotFound(redact(f"no such file or folder: {loc}")) from None
    except OSError as e:
        raise StorageError(explain(e, loc, action)) from None
    except Exception as e:  # pyarrow's ArrowInvalid for malformed URIs and the like
        if type(e).__module__.startswith("pyarrow"):
            raise StorageError(explain(e, loc, action)) from None
        raise


def check_writable(location: str | os.PathLike[str]) -> None:
    """Fail early, in one line, when output cannot go to ``location``: an unknown scheme, a
    bucket that does not exist (some S3 servers would create it on the first PUT), wrong
    credentials or an endpoint that does not answer."""
    loc = normalize(location)
    fs, path = resolve(loc)
    if isinstance(fs, pafs.LocalFileSystem):
        _check_local_folder(Path(path), loc)
        return
    bucket = path.split("/", 1)[0]
    with _errors(loc, "write to"):
        if is_remote_object_store(fs) and \
                fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"cannot write to {loc}: bucket '{bucket}' does not exist "
                               "(create it first)")
        fs.get_file_info(path)  # credentials and endpoint


def _check_local_folder(path: Path, loc: str) -> None:
    """A local output folder: it, or its nearest existing parent, must be a writable folder."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StorageError(f"cannot write to {loc}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write to {loc}: {probe} is not writable (permission "
                           "denied)")


# ------------------------------------------------------------------------ file ops

@dataclass(frozen=True)
class Stat:
    st_size: int
    st_mtime_ns: int


def info(location: str | os.PathLike[str]) -> pafs.FileInfo:
    fs, path = resolve(location)
    with _errors(str(location), "read"):
        return fs.get_file_info(path)


def exists(location: str | os.PathLike[str]) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike[str]) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike[str]) -> bool:
    return info(location).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    fs, path = resolve(location)
    with _errors(str(location), "read"):
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(location: str | os.PathLike[str]) -> str:
    return read_bytes(location).decode("utf-8", errors="replace")


def read_json(location: str | os.PathLike[str]) -> Any:
    return json.loads(read_bytes(location))


def makedirs(location: str | os.PathLike[str]) -> None:
    fs, path = resolve(location)
    with _errors(str(location), "create"):
        fs.create_dir(path, recursive=True)


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Readers see the old object or the new one, never half of it: one PUT on an object
    store, a write to a temporary name then a rename on a file system."""
    fs, path = resolve(location)
    with _errors(str(location), "write"):
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path),
                               f".{os.path.basename(path)}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        if not is_remote_object_store(fs):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def is_remote_object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in ("s3", "gcs")


def write_text(location: str | os.PathLike[str], text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: str | os.PathLike[str], data: Any) -> None:
    write_text(location, json.dumps(data, indent=2) + "\n")


def create_exclusive(location: str | os.PathLike[str], text: str = "") -> bool:
    """Create a marker object unless it exists; True when this call created it. Atomic on a
    file system; on an object store a check then a PUT (good enough for markers that one
    process at a time writes)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "x") as f:
                f.write(text)
            return True
        except FileExistsError:
            return False
    if exists(location):
        return False
    write_text(location, text)
    return True


def delete_dir(location: str | os.PathLike[str]) -> None:
    """Remove a folder / prefix and everything under it; nothing there is fine."""
    fs, path = resolve(location)
    with _errors(str(location), "delete"):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)


def delete_file(location: str | os.PathLike[str]) -> None:
    fs, path = resolve(location)
    with _errors(str(location), "delete"):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)


def listdir(location: str | os.PathLike[str], recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under a folder / prefix (empty when it does not exist)."""
    fs, path = resolve(location)
    with _errors(str(location), "list"):
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True,
                                                  recursive=recursive))


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a folder / prefix to another location (e.g. a local dataset into a bucket)."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    with _errors(f"{src} -> {dst}", "copy"):
        pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs,
                        use_threads=True)


def local_copy(location: str | os.PathLike[str], folder: str | os.PathLike[str]) -> str:
    """A local path holding the file at ``location`` (itself when it is local; else a
    download into ``folder``)."""
    if not is_remote(location):
        return normalize(location)
    target = os.path.join(str(folder), name(location))
    with open(target, "wb") as f:
        f.write(read_bytes(location))
    return target


def open_input(location: str | os.PathLike[str]) -> io.BytesIO:
    return io.BytesIO(read_bytes(location))


# ------------------------------------------------------------- a pathlib-like view

class StoragePath:
    """The subset of ``pathlib.Path`` that dataset readers use, over any location.

    Directory listings are cached and shared by every path derived from one root, so
    checking 10,000 files in a bucket costs a few LIST calls, not 10,000 HEADs.
    """

    def __init__(self, loc: str | os.PathLike[str], _cache: dict | None = None):
        self._loc = normalize(loc)
        self._cache: dict[str, dict[str, pafs.FileInfo]] = {} if _cache is None else _cache

    # --- names
    def __str__(self) -> str:
        return self._loc

    def __repr__(self) -> str:
        return f"StoragePath({self._loc!r})"

    def __fspath__(self) -> str:
        return self._loc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and other._loc == self._loc

    def __hash__(self) -> int:
        return hash(self._loc)

    def __lt__(self, other: StoragePath) -> bool:
        return self._loc < other._loc

    def __truediv__(self, part: str | os.PathLike[str]) -> StoragePath:
        return StoragePath(join(self._loc, str(part).replace("\\", "/")), self._cache)

    @property
    def name(self) -> str:
        return name(self._loc)

    @property
    def stem(self) -> str:
        n = self.name
        return n.rsplit(".", 1)[0] if "." in n.lstrip(".") else n

    @property
    def suffix(self) -> str:
        n = self.name
        return "." + n.rsplit(".", 1)[1] if "." in n.lstrip(".") else ""

    @property
    def parent(self) -> StoragePath:
        return StoragePath(parent(self._loc), self._cache)

    def view(self, loc: str | os.PathLike[str]) -> StoragePath:
        """Another location, sharing this one's listing cache."""
        return StoragePath(loc, self._cache)

    @property
    def is_remote(self) -> bool:
        return is_remote(self._loc)

    # --- listings (cached)
    def _listing(self, folder: str) -> dict[str, pafs.FileInfo]:
        if folder not in self._cache:
            self._cache[folder] = {i.base_name: i for i in listdir(folder)}
        return self._cache[folder]

    def _info(self) -> pafs.FileInfo | None:
        par = parent(self._loc)
        if par == self._loc:  # a bucket or the file system root
            i = info(self._loc)
            return None if i.type == pafs.FileType.NotFound else i
        return self._listing(par).get(self.name)

    def exists(self) -> bool:
        return self._info() is not None

    def is_dir(self) -> bool:
        i = self._info()
        return i is not None and i.type == pafs.FileType.Directory

    def is_file(self) -> bool:
        i = self._info()
        return i is not None and i.type == pafs.FileType.File

    def stat(self) -> Stat:
        i = self._info()
        if i is None:
            raise NotFound(f"no such file: {self._loc}")
        return Stat(int(i.size or 0), int(i.mtime_ns or 0))

    def iterdir(self) -> Iterator[StoragePath]:
        for n in sorted(self._listing(self._loc)):
            yield self / n

    def glob(self, pattern: str) -> Iterator[StoragePath]:
        """Non-recursive name patterns only (``*.txt``)."""
        assert "/" not in pattern, "StoragePath.glob matches names in one folder"
        for p in self.iterdir():
            if fnmatch.fnmatch(p.name, pattern):
                yield p

    def rglob(self, pattern: str) -> Iterator[StoragePath]:
        for i in sorted(listdir(self._loc, recursive=True), key=lambda i: i.path):
            if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern):
                yield StoragePath(location(filesystem(self._loc), i.path, self._loc),
                                  self._cache)

    # --- content
    def read_bytes(self) -> bytes:
        return read_bytes(self._loc)

    def read_text(self, encoding: str = "utf-8", errors: str = "replace") -> str:
        return self.read_bytes().decode(encoding, errors=errors)


def path(loc: str | os.PathLike[str] | StoragePath) -> StoragePath:
    """A pathlib-like view of a location (fresh listing cache)."""
    return loc if isinstance(loc, StoragePath) else StoragePath(loc)


def as_location(loc: str | os.PathLike[str] | StoragePath | Path) -> str:
    """A location string for any path-like (the form saved in manifests and results)."""
    return normalize(str(loc))
