"""Where shards live: a location -> byte streams of its files, with timeouts, retries and a node cache.

A location (`data.shards`, `eval.shards`, the `shards` argument of every reader) names a folder of
shards; a file NAME in it (a shard such as `train-000003.tar`, or `manifest.json`) is read from:

- `data/shards/market`, `file:///data/shards/market`: the local file `data/shards/market/NAME`;
- `http://host:8000/market/` (or `https://`): `http://host:8000/market/NAME`;
- `pipe:CMD`: the standard output of the shell command CMD with `{name}` replaced by NAME, e.g.
  `pipe:curl -s --fail http://host/market/{name}` or `pipe:aws s3 cp s3://bucket/market/{name} -`;
- `s3://bucket/market`, `gs://bucket/market`, any fsspec URL: fsspec's `<location>/NAME`; needs the
  fsspec backend of the scheme (`pip install s3fs`, `gcsfs`) and its usual credentials.

Any location may contain `{name}` to put NAME elsewhere than at the end (a URL with a query string).

Opening: local files, `file://` and `pipe:` go through webdataset's `gopen`; HTTP through urllib,
because webdataset's HTTP opener (curl in a subprocess) has no read timeout (a stalled server hangs
it) and cannot resume; other schemes through fsspec. Every read of a remote file has a timeout
(`timeout_s`: the connection, each socket read, each read from a pipe command; fsspec URLs use their
backend's own timeouts, e.g. s3fs's). A `pipe:` location runs a shell command taken from the
configuration, as webdataset's does: use trusted configurations only. A transient failure
(connection refused or reset, a timeout, HTTP 5xx/408/429, a pipe command that exits non-zero, a file
that ends early) is retried up to `attempts` times in a row with exponential back-off (0.5, 1, 2, 4 s,
...), re-opening the file at the byte already reached (an HTTP range request; other sources re-read
and discard). HTTP 401/403/404/410 and a missing local file are not retried. When the attempts are
spent the ShardError names the URL.

Integrity: `ShardFile` hashes every byte it reads. When a reader is done with a shard it calls
`finish_shard`, which reads on to the end and compares the sha256 with the manifest's — unless this
process already verified that shard (local files: same path, size and mtime; remote files: same URL),
in which case it stops at once. So a shard is fully read and checked the first time a process reads
it, and later reads stop after the last sample they need, trusting that check and the reader's
position checks. DataLoader workers are new processes every epoch: without `cache_dir` each reads the
remote shards it touches in full once per epoch (with `cache_dir` they read the verified local copy).

Node-local cache (`cache_dir`, remote locations only; local shards are never copied): each shard is
downloaded once per node into `cache_dir/<sha256>.tar` (content-addressed, so shard sets share it and
a rebuilt shard gets a new file), under an exclusive `fcntl.flock` on `cache_dir/<sha256>.lock` so that
concurrent ranks and DataLoader workers download it once, into a temporary file that is renamed into
place only after its sha256 matched the manifest. Later epochs, workers and restarts read the local
copy. Nothing is ever evicted: delete the folder to reclaim the space.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import io
import os
import select
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen as wds_gopen

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_ATTEMPTS = 5
BACKOFF_S = 0.5
_CHUNK = 1 << 20
_PERMANENT_HTTP = (401, 403, 404, 410)


class ShardError(RuntimeError):
    """A shard or manifest is missing, unreachable, truncated, tampered with or inconsistent (the
    message names its path or URL)."""


class _Gone(ShardError):
    """A file that does not exist at its location (not retried)."""


def location_text(location) -> str:
    return location.location if isinstance(location, ShardSource) else str(location)


def is_remote(location) -> bool:
    """False for a local directory or file:// URL; True for everything else."""
    text = location_text(location)
    if text.startswith("pipe:"):
        return True
    scheme = urlparse(text).scheme
    return scheme not in ("", "file") and len(scheme) > 1     # one letter: a Windows drive


# --------------------------------------------------------------------------------------------------
# Openers: (url, offset, timeout_s) -> (raw stream, bytes to discard, total size or None)
# --------------------------------------------------------------------------------------------------
def _open_local(path: str, offset: int, timeout_s: float):
    try:
        fh = wds_gopen(path, "rb")
    except FileNotFoundError:
        raise _Gone(f"shard {path} is missing") from None
    except OSError as exc:          # permissions, a folder in its place: retrying will not help
        raise ShardError(f"shard {path} cannot be opened: {exc}") from None
    size = os.fstat(fh.fileno()).st_size
    fh.seek(offset)
    return fh, 0, size


def _open_http(url: str, offset: int, timeout_s: float):
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in _PERMANENT_HTTP:
            raise _Gone(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise
    partial = resp.status == 206
    length = resp.headers.get("Content-Length")
    total = None if length is None else int(length) + (offset if partial else 0)
    return resp, (0 if partial else offset), total


class _PipeReader(io.RawIOBase):
    """The standard output of a webdataset `Pipe`, each read bounded by `timeout_s` (select)."""

    def __init__(self, pipe, timeout_s: float):
        self.pipe, self.timeout_s, self.fd = pipe, timeout_s, pipe.stream.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            raise TimeoutError(f"the command wrote nothing for {self.timeout_s:.0f} s")
        data = os.read(self.fd, len(b))
        if not data:             # end of output: the command's exit status decides (IOError if not 0)
            self.pipe.close()
            return 0
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.pipe.proc.poll() is None:
            self.pipe.proc.kill()    # stopped early: never wait for a command that is still writing
        try:
            self.pipe.close()
        except OSError:
            pass
        super().close()


def _open_pipe(command: str, offset: int, timeout_s: float):
    return _PipeReader(wds_gopen("pipe:" + command, "rb"), timeout_s), offset, None


def _open_fsspec(url: str, offset: int, timeout_s: float):
    import fsspec

    scheme = urlparse(url).scheme
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise ShardError(f"{url}: fsspec cannot open '{scheme}://' URLs ({exc}). Install its backend "
                         "(s3fs for s3://, gcsfs for gs://) or use a pipe: location, e.g. "
                         "'pipe:aws s3 cp s3://bucket/dir/{name} -'") from None
    try:
        fh = fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise _Gone(f"{url} does not exist") from None
    fh.seek(offset)
    return fh, 0, getattr(fh, "size", None)


_TRANSIENT = (OSError, http.client.HTTPException, EOFError)


class ShardFile(io.RawIOBase):
    """Sequential reads of one file that survive transient failures, hashing every byte (see the
    module docstring). `size` (from the manifest) turns a short file into an error."""

    def __init__(self, url: str, opener, target: str, *, size: int | None, timeout_s: float, attempts: int):
        self.url, self.opener, self.target, self.size = url, opener, target, size
        self.timeout_s, self.attempts = timeout_s, max(1, attempts)
        self.raw, self.pos, self.failures = None, 0, 0
        self.digest = hashlib.sha256()
        self.key = None          # what marks this file verified in this process (see finish_shard)

    def __repr__(self) -> str:
        return self.url

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        raw, skip, total = self.opener(self.target, self.pos, self.timeout_s)
        self.raw = raw
        if self.size is not None and total is not None and total != self.size:
            raise ShardError(f"shard {self.url} has {total} bytes, the manifest says {self.size}: "
                             "truncated or replaced; re-run launch/prepare_data.py")
        scratch = bytearray(min(_CHUNK, max(skip, 1)))
        while skip > 0:              # a source that cannot seek: read again up to where we were
            n = raw.readinto(memoryview(scratch)[:min(skip, len(scratch))])
            if not n:
                raise EOFError(f"ended before byte {self.pos}")
            skip -= n

    def readinto(self, b) -> int:
        while True:
            try:
                if self.raw is None:
                    self._connect()
                n = self.raw.readinto(b)
                if not n and self.size is not None and self.pos < self.size:
                    raise EOFError(f"ended after {self.pos} of {self.size} bytes")
                if n:
                    self.digest.update(memoryview(b)[:n])
                    self.pos += n
                self.failures = 0
                return n
            except ShardError:
                raise
            except _TRANSIENT as exc:
                self._drop()
                self.failures += 1
                if self.failures >= self.attempts:
                    raise ShardError(f"{self.url} unreachable: {self.attempts} attempts in a row failed, the "
                                     f"last at byte {self.pos}: {type(exc).__name__}: {exc}") from None
                time.sleep(min(BACKOFF_S * 2 ** (self.failures - 1), 30.0))

    def _drop(self) -> None:
        if self.raw is not None:
            try:
                self.raw.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self.raw = None

    def read_all(self) -> bytes:
        out = io.BytesIO()
        buf = bytearray(_CHUNK)
        while n := self.readinto(buf):
            out.write(memoryview(buf)[:n])
        return out.getvalue()

    def finish(self, sha256: str | None) -> None:
        """Read to the end and compare the sha256 (when `sha256` is given); then close."""
        if sha256 is not None:
            buf = bytearray(_CHUNK)
            while self.readinto(buf):
                pass
            actual = self.digest.hexdigest()
            if actual != sha256:
                raise ShardError(f"shard {self.url}: sha256 {actual} does not match the manifest's {sha256} "
                                 "(corrupted or modified); re-run launch/prepare_data.py")
        self.close()

    def close(self) -> None:
        self._drop()
        super().close()


# --------------------------------------------------------------------------------------------------
# One shard set
# --------------------------------------------------------------------------------------------------
_VERIFIED: set = set()   # per process: shards whose sha256 matched (local identity or URL)


@dataclass(frozen=True)
class ShardSource:
    """One shard set's location with how to read it (picklable: it travels to DataLoader workers)."""

    location: str
    cache_dir: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS

    def __str__(self) -> str:
        return self.location

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def url(self, name: str) -> str:
        loc = self.location
        if "{name}" in loc:
            return loc.replace("{name}", name)
        if loc.startswith("pipe:"):
            raise ShardError(f"the pipe: location {loc!r} has no {{name}}: write where the file name goes, "
                             "e.g. 'pipe:curl -s --fail http://host/dir/{name}'")
        if urlparse(loc).scheme == "file":
            loc = url2pathname(urlparse(loc).path)
        if not self.remote:
            return str(Path(loc) / name)
        return loc.rstrip("/") + "/" + name

    def local_path(self, name: str) -> Path | None:
        return None if self.remote else Path(self.url(name))

    def open(self, name: str, size: int | None = None) -> ShardFile:
        url = self.url(name)
        if not self.remote:
            opener, target = _open_local, url
        elif url.startswith("pipe:"):
            opener, target = _open_pipe, url[len("pipe:"):]
        elif urlparse(url).scheme in ("http", "https"):
            opener, target = _open_http, url
        else:
            opener, target = _open_fsspec, url
        return ShardFile(url, opener, target, size=size, timeout_s=self.timeout_s, attempts=self.attempts)

    def read_bytes(self, name: str) -> bytes:
        stream = self.open(name)
        try:
            return stream.read_all()
        finally:
            stream.close()

    def open_shard(self, entry: dict, verify: bool) -> tuple[ShardFile, str | None]:
        """A stream of the shard `entry` (a manifest entry) and the sha256 its reader must check with
        `finish_shard` (None when this process has verified that file already, or `verify` is off)."""
        size = entry.get("bytes")
        if self.remote and self.cache_dir:
            path = self._cached(entry)
            stream = ShardFile(str(path), _open_local, str(path), size=size, timeout_s=self.timeout_s,
                               attempts=1)
            stream.key = _local_key(path)
        elif self.remote:
            stream = self.open(entry["name"], size)
            stream.key = stream.url
        else:
            stream = self.open(entry["name"], size)
            stream.key = _local_key(Path(stream.url))
            if stream.key is None:
                raise ShardError(f"shard {stream.url} is missing (listed in {self.url('manifest.json')}); "
                                 "re-run launch/prepare_data.py or restore the file")
        return stream, (entry["sha256"] if verify and stream.key not in _VERIFIED else None)

    def _cached(self, entry: dict) -> Path:
        """The node-local copy of a remote shard, downloaded (once per node, verified) when missing."""
        folder = Path(self.cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        sha = entry["sha256"]
        final = folder / f"{sha}.tar"
        with open(folder / f"{sha}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, or when the process dies
            if final.is_file() and final.stat().st_size == entry.get("bytes", final.stat().st_size):
                return final
            tmp = folder / f".{sha}.{os.getpid()}.tmp"
            stream = self.open(entry["name"], entry.get("bytes"))
            try:
                with open(tmp, "wb") as out:
                    buf = bytearray(_CHUNK)
                    while n := stream.readinto(buf):
                        out.write(memoryview(buf)[:n])
                    out.flush()
                    os.fsync(out.fileno())
                stream.finish(sha)           # everything read: compares the sha256
                os.replace(tmp, final)
            finally:
                stream.close()
                tmp.unlink(missing_ok=True)
            _VERIFIED.add(_local_key(final))
            return final


def finish_shard(stream: ShardFile, check: str | None) -> None:
    """After reading a shard: verify it when `check` (its sha256) is given, remember it, close it."""
    stream.finish(check)
    if check is not None:
        _VERIFIED.add(stream.key)


def _local_key(path: Path | None):
    try:
        stat = path.stat()
    except (FileNotFoundError, AttributeError):
        return None
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def as_source(shards, **options) -> ShardSource:
    """A ShardSource from a location (str/Path) or an existing ShardSource (options then ignored)."""
    if isinstance(shards, ShardSource):
        return shards
    return ShardSource(str(shards), **{k: v for k, v in options.items() if v is not None})
