"""ImageNet weights for the trunk: `load_pretrained` takes a file path or a URL, drops the classifier
(`fc.*`), refuses shape mismatches and reports missing or unexpected keys.

A URL is fetched by `fetch_pretrained`: downloaded once into the torch hub cache
(`torch.hub.get_dir()/checkpoints`, i.e. `$TORCH_HOME/hub/checkpoints`, the same file torchvision
itself would use) and checked against the sha256 prefix its name carries (torchvision's
`resnet50-0676ba61.pth`) or an explicit `#sha256=<hex>` fragment, at download and again every time
the cached file is reused. Without network the run stops with a `PretrainedWeightsError` that says
where the file goes and how to proceed offline. Under torchrun, `fetch_pretrained_once_per_node` lets
one process per node download while the others wait. The file is read by pipeline.checkpoint's
weights-only loader.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed as D
from .backbone import IMAGENET_URLS, ResNet

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What `load_pretrained` did: keys copied, backbone keys absent from the file (left at their
    initialisation), file keys with no place in the backbone, and the ImageNet classifier keys dropped."""
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"pretrained weights from {self.source}: {len(self.loaded)} tensors loaded, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.ignored)} classifier keys dropped")
        if self.missing:
            text += f"\n  missing (kept at random init): {', '.join(self.missing)}"
        if self.unexpected:
            text += f"\n  unexpected (not used): {', '.join(self.unexpected)}"
        return text


# ------------------------------------------------------------------------------ fetching the file
URL_SCHEMES = ("http", "https", "file", "ftp")
DOWNLOAD_TIMEOUT_S = 60.0   # per blocking socket operation (connect, each read): a dead link cannot hang
DOWNLOAD_ATTEMPTS = 3       # transient failures (refused, reset, timeout, 5xx, cut short) are retried
BACKOFF_S = 1.0             # wait before the second attempt, doubled before each further one
# torchvision (and torch.hub's check_hash) name files <name>-<first hex digits of the sha256>.<ext>;
# 8 digits at least here, so that a name like `weights-2024.pth` is not taken for a hash.
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.")
_FRAGMENT_HASH = re.compile(r"sha256=([0-9a-fA-F]{8,64})")
_CHUNK = 1 << 20
_UNVERIFIABLE_WARNED: set[str] = set()


class PretrainedWeightsError(RuntimeError):
    """The pretrained weights cannot be had: unreachable URL, failed hash check, missing or unreadable
    file. Raised before training starts; `launch/train.py` prints it and exits with status 2, like a
    config error. `all_ranks` is True when every rank raised the same error
    (`fetch_pretrained_once_per_node`), so that rank 0 alone needs to print it."""

    def __init__(self, message: str, *, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


class PretrainedFileNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """`model.pretrained` is a local path with no file there (also a FileNotFoundError, as it was)."""


class _Transient(Exception):
    """A download failure worth another attempt (network hiccup, overloaded server, transfer cut short)."""


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in URL_SCHEMES


def pretrained_cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the file at `url` is cached: `cache_dir` (default `torch.hub.get_dir()/checkpoints`, which
    follows TORCH_HOME) joined with the URL's file name. This is the place and name torch.hub and
    torchvision use, so weights either of them downloaded before are found (and checked)."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise PretrainedWeightsError(f"model.pretrained: {url} names no file; the URL path must end with a "
                                     f"file name such as resnet50-0676ba61.pth")
    base = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return base.expanduser() / name


def expected_sha256_prefix(url: str) -> str | None:
    """The sha256 prefix a URL promises: an explicit `#sha256=<8 to 64 hex digits>` fragment, else the
    hex digits in its file name (`resnet50-0676ba61.pth` -> `0676ba61`), else None (not verifiable)."""
    parts = urllib.parse.urlparse(url)
    if parts.fragment:
        found = _FRAGMENT_HASH.fullmatch(parts.fragment)
        if not found:
            raise PretrainedWeightsError(f"model.pretrained: {url}: the only URL fragment understood is "
                                         f"#sha256=<hex>, with 8 to 64 hex digits of the file's sha256")
        return found.group(1).lower()
    found = _NAME_HASH.search(os.path.basename(parts.path))
    return found.group(1) if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _ways_out(url: str, dst: Path) -> str:
    return (f"The file would be cached at {dst}. Either\n"
            f"  - download {url} on a machine with network access and set "
            f"model.pretrained=/path/to/{dst.name} (or copy the file to {dst}, where it is checked and "
            f"used from then on), or\n"
            f"  - set model.pretrained=null to train from random weights.")


def _network_error(exc: BaseException) -> _Transient:
    """URLError: refused, no route, name resolution (offline); OSError: timeouts, resets;
    HTTPException: the connection dropped mid-response."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return _Transient(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)


def _open_url(url: str, dst: Path, timeout_s: float):
    request = urllib.request.Request(url, headers={"User-Agent": "alignedreid-pipeline"})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise PretrainedWeightsError(f"model.pretrained: cannot download {url}: HTTP {exc.code} {exc.reason}. "
                                     + _ways_out(url, dst)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(exc) from None


def _read_block(response) -> bytes:
    try:
        return response.read(_CHUNK)
    except (http.client.HTTPException, OSError) as exc:
        raise _network_error(exc) from None


def _download_once(url: str, dst: Path, expected: str | None, timeout_s: float, progress: bool) -> None:
    """One attempt: stream `url` into a fresh temporary file beside `dst`, check its length and sha256,
    and only then rename it to `dst`, so that `dst` never holds a partial or unverified file. The
    temporary name is unique (uuid) rather than pid-based: nodes sharing a cache directory on a network
    filesystem may download at the same time, with equal pids in identical containers."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.partial")
    try:
        with _open_url(url, dst, timeout_s) as response, open(tmp, "xb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest, size = hashlib.sha256(), 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dst.name,
                      disable=not progress, file=sys.stderr) as bar:
                for block in iter(lambda: _read_block(response), b""):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
                    bar.update(len(block))
        if total is not None and size != total:   # http.client hands over a cut-off body without an error
            raise _Transient(f"transfer cut short: {size} of {total} bytes")
        actual = digest.hexdigest()
        if expected is not None and not actual.startswith(expected):
            raise PretrainedWeightsError(
                f"model.pretrained: the file downloaded from {url} has sha256 {actual}, which does not start "
                f"with the expected {expected}; it was not cached. The server sent another file than the "
                f"URL promises: check the URL. " + _ways_out(url, dst))
        os.replace(tmp, dst)
    except OSError as exc:   # the file side only (network errors are _Transient by now): disk full, read-only
        raise PretrainedWeightsError(f"model.pretrained: cannot write the download of {url} to {dst} ({exc}); "
                                     f"free some space or set TORCH_HOME to a writable directory. "
                                     + _ways_out(url, dst)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _download(url: str, dst: Path, expected: str | None, timeout_s: float, attempts: int,
              progress: bool) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PretrainedWeightsError(f"model.pretrained: cannot create the cache directory {dst.parent} "
                                     f"({exc}); set TORCH_HOME to a writable directory. "
                                     + _ways_out(url, dst)) from None
    if progress:
        print(f"downloading {url} to {dst}", file=sys.stderr, flush=True)
    reasons = []
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, dst, expected, timeout_s, progress)
            return
        except _Transient as exc:
            reasons.append(str(exc))
            if attempt < attempts:
                log.warning(f"download of {url} failed ({exc}); attempt {attempt + 1} of {attempts} in "
                            f"{BACKOFF_S * 2 ** (attempt - 1):g} s")
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    offline = "" if url.startswith("file:") else ": no network here, or the host is unreachable from here"
    raise PretrainedWeightsError(
        f"model.pretrained: cannot download {url} ({reasons[-1]}; {attempts} attempt(s), {timeout_s:g} s "
        f"timeout each){offline}. " + _ways_out(url, dst))


def fetch_pretrained(source: str, cache_dir: str | os.PathLike | None = None, *,
                     timeout_s: float = DOWNLOAD_TIMEOUT_S, attempts: int = DOWNLOAD_ATTEMPTS,
                     progress: bool = True) -> Path:
    """The local file for `model.pretrained`: a path is returned as it is (it must exist); a URL is
    downloaded once into `pretrained_cache_path(url, cache_dir)` and read from there afterwards.

    A URL's file is checked against `expected_sha256_prefix(url)` both when downloaded and every time
    the cached copy is reused (a file modified in the cache is refused, not silently trained from).
    A URL that promises no hash is accepted with a warning. Downloads are bounded: `timeout_s` per
    socket operation, `attempts` tries with a backoff for transient errors; then PretrainedWeightsError
    names the URL, the cache path and the ways to go on offline."""
    if not is_url(source):
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise PretrainedFileNotFoundError(
                f"model.pretrained: no file at {path}; give the path or URL of torchvision-named ImageNet "
                f"weights (e.g. {IMAGENET_URLS['resnet50']}), or set model.pretrained=null to start from "
                f"random weights")
        return path
    dst = pretrained_cache_path(source, cache_dir)
    expected = expected_sha256_prefix(source)
    if expected is None and source not in _UNVERIFIABLE_WARNED:
        _UNVERIFIABLE_WARNED.add(source)   # once per process, not once per model built
        log.warning(f"model.pretrained: {source} carries no sha256 prefix in its file name "
                    f"(name-<hex>.ext) and no #sha256=<hex> fragment; {dst} cannot be verified")
    if not dst.is_file():
        _download(source, dst, expected, timeout_s, max(1, attempts), progress)
    elif expected is not None:
        actual = _sha256(dst)
        if not actual.startswith(expected):
            raise PretrainedWeightsError(
                f"model.pretrained: the cached file {dst} has sha256 {actual}, which does not start with the "
                f"expected {expected} (from {source}); it was modified or damaged after the download. Delete "
                f"{dst} to download it again.")
    return dst


def fetch_pretrained_once_per_node(source: str, local_rank: int, cache_dir: str | os.PathLike | None = None,
                                   **kwargs) -> Path:
    """Collective (every rank calls it): local rank 0 of each node runs `fetch_pretrained` while the
    node's other ranks wait, so a node downloads the file once and its other ranks then read the cached
    copy. If it fails on any node, every rank raises the same PretrainedWeightsError (`all_ranks=True`)
    instead of the others waiting at a barrier until the collective timeout."""
    error, failure = None, None
    if local_rank == 0:
        try:
            fetch_pretrained(source, cache_dir, **kwargs)
        except Exception as exc:   # reported to every rank below; unexpected ones re-raised as they are
            failure = exc
            error = str(exc) if isinstance(exc, PretrainedWeightsError) else f"{type(exc).__name__}: {exc}"
    outcomes = D.all_gather_object((socket.gethostname(), error))   # also the barrier after the download
    if failure is not None and not isinstance(failure, PretrainedWeightsError):
        raise failure
    for rank, (host, message) in enumerate(outcomes):
        if message is not None:
            where = f"[rank {rank} on {host}] " if len(outcomes) > 1 else ""
            raise PretrainedWeightsError(where + message, all_ranks=True)
    return pretrained_cache_path(source, cache_dir) if is_url(source) else Path(os.path.expanduser(source))


def _read_state_dict(source: str, cache_dir: str | None) -> dict[str, torch.Tensor]:
    from ..checkpoint import CheckpointError, load_weights

    path = fetch_pretrained(source, cache_dir)
    try:
        state = load_weights(path)
    except CheckpointError as exc:  # not a torch file, or pickled objects weights_only refuses
        hint = f" Delete {path} to download it again." if is_url(source) else ""
        raise PretrainedWeightsError(f"model.pretrained: {path} cannot be read with torch.load(weights_only="
                                     f"True) ({exc}).{hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained: {source} does not hold a state dict (a mapping of parameter "
                         f"names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(backbone: ResNet, source: str, cache_dir: str | None = None) -> LoadReport:
    """Copy torchvision-named ImageNet weights from a file path or URL into `backbone`.

    The classifier (`fc.*`) is dropped. Shape mismatches (usually another depth's weights) are errors;
    no matching key at all is an error (not a torchvision ResNet state dict). Missing and unexpected
    keys are reported in the returned LoadReport and logged as a warning."""
    state = _read_state_dict(source, cache_dir)
    report = LoadReport(source=source)
    own = backbone.state_dict()
    usable: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in state.items():
        if key.startswith("fc."):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif value.shape != own[key].shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
    if mismatched:
        raise ValueError(f"model.pretrained: {source} does not fit backbone {backbone.name}; shape "
                         f"mismatches: {'; '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}. "
                         f"Use weights of the same network (depth, ResNet or ResNeXt) as model.backbone.")
    if not usable:
        raise ValueError(f"model.pretrained: {source} has no key of a torchvision {backbone.name} (first "
                         f"keys: {', '.join(list(state)[:5])}); expected names like conv1.weight, "
                         f"layer1.0.conv1.weight")
    backbone.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    # BatchNorm's num_batches_tracked is a counter, absent from older torchvision files: not a weight.
    report.missing = sorted(k for k in set(own) - set(usable) if not k.endswith("num_batches_tracked"))
    if report.missing or report.unexpected:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    return report
