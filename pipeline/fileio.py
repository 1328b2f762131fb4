"""Atomic file writes: nothing half-written ever sits under a final name.

`atomic_path(path)` hands out a temporary name in the same folder (so the rename stays on one
filesystem) and moves it over `path` only when the block ends without error; on error the temporary
file is removed and `path` is untouched. Use it for writers that want a path (tarfile, savefig, ONNX);
`atomic_write(path, data)` for bytes or text.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Write `data` to `path` atomically; `fsync=True` also forces it to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
