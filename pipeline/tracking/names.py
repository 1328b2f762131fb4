"""Names and values MLflow accepts, and where the store is (the rule itself: pipeline.config).

MLflow's limits are our own constants here (its validation module is private and moves between
releases); they are those of MLflow 3 (mlflow/utils/validation.py), which a store enforces.
"""
from __future__ import annotations

import posixpath
import re
import secrets
import time
from typing import Any

from pipeline.config import DEFAULT_TRACKING_URI, resolve_tracking_uri  # noqa: F401 (the rule lives in config)

MAX_ENTITY_KEY_LENGTH = 250          # param / metric / tag key
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100      # per log_batch request
MAX_METRICS_PER_BATCH = 1000
MODEL_VERSIONS_TAG = "mlflow.modelVersions"   # a logged model's registered versions (as MLflow writes it)
_VALID_KEY = re.compile(r"^[/\w.\- :]*$")      # alphanumerics, _ - . space : /
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def default_run_name(*parts: Any, now: float | None = None) -> str:
    """A run name that says what the run is and tells runs apart, for when tracking.run_name is unset:
    the parts joined by '-', then the local start time and 4 random hex digits, e.g.
    ``market1501-ddp-w2-20261206-213005-9f1c`` (the trainer's parts: experiment, engine, world size).

    Why not MLflow's generated names: MLflow draws them from Python's `random`, which the trainer
    seeds, so every run of a seed got the same name. The suffix here comes from the OS (secrets),
    which no seed touches."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return "-".join([*(str(p) for p in parts if p not in (None, "")), stamp, secrets.token_hex(2)])


def _path_not_unique(key: str) -> bool:
    """MLflow refuses keys that are not their own normalised path ('a//b', '..', '/x', '.')."""
    norm = posixpath.normpath(key)
    return norm != key or norm == "." or norm.startswith("..") or norm.startswith("/")


def clean_key(name: Any) -> str:
    """A param/metric/tag key MLflow accepts: invalid characters become '_', at most 250 chars."""
    key = str(name)
    if _VALID_KEY.match(key) and not _path_not_unique(key) and 0 < len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    key = _BAD_KEY_CHARS.sub("_", key).replace("/", "_")[:MAX_ENTITY_KEY_LENGTH]
    return key if key and not _path_not_unique(key) else ("_" + key)[:MAX_ENTITY_KEY_LENGTH]


def clip_value(value: Any, limit: int) -> str:
    """str(value) ('None' for None), truncated to `limit` chars with a note saying so."""
    text = "None" if value is None else str(value)
    if len(text) <= limit:
        return text
    note = f"...[truncated from {len(text)} chars; full value in config.yaml]"
    return text[: limit - len(note)] + note


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of pipeline.config.flatten: {'a.b': 1} -> {'a': {'b': 1}}."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = str(dotted).split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"params: key '{dotted}' nests under '{part}', which is a value")
        node[leaf] = value
    return tree


def plain(value: Any) -> Any:
    """Make a params value safe for yaml.safe_dump (unknown types become their str())."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
