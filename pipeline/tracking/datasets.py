"""The training's data as MLflow dataset inputs: one per shard set, with the manifest's digest.

A run's Datasets panel (and `run.inputs.dataset_inputs`) then lists, per shard set of data.shards, an
input with context `training` (its train split), and one with context `evaluation` for the set that
`eval.shards` evaluates (its query + gallery splits). Each is an MLflow dataset built with MLflow's
dataset API (`mlflow.data`):

    name      <set name>/train or <set name>/query+gallery (data.shard_set_name: the location's last
              folder, e.g. market1501)
    digest    the first 32 hex digits of the manifest file's sha256 (MLflow keeps at most 36 characters;
              the run tag dataset_manifest_sha256 has all 64), so runs on the same data share it
    source    the location as given in data.shards: an HTTPDatasetSource for http(s) URLs (MLflow's
              own), else a ShardLocation {"uri": ...} (folders, pipe: commands, s3://, ...)
    profile   JSON: source_format, num_classes, and per split images / identities / cameras

Search runs by their data with ``mlflow.search_runs(filter_string="dataset.digest = '<digest>'")`` (also
`dataset.name`, `dataset.context`), or ``MlflowClient().search_runs([experiment_id], "dataset.digest =
'...'")``.
"""
from __future__ import annotations

import json
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag

CONTEXT_TAG = "mlflow.data.context"          # the input tag MLflow's log_input(context=...) sets
CONTEXTS = ("training", "evaluation")
DIGEST_CHARS = 32


class ShardLocation(DatasetSource):
    """Where a shard set lives, as data.shards names it (a folder, a pipe: command, s3://, ...)."""

    def __init__(self, uri: str):
        self._uri = str(uri)

    @property
    def uri(self) -> str:
        return self._uri

    @staticmethod
    def _get_source_type() -> str:
        return "reid-shards"

    def load(self, dst_path=None) -> str:
        """The location itself: pipeline.data reads shard sets where they are (no download here)."""
        return self._uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False                     # only created here, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: Any) -> ShardLocation:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> ShardLocation:
        return cls(source_dict["uri"])


class ShardSet(Dataset):
    """A shard set as an MLflow dataset: metadata only (the images stay in the shards)."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:    # the digest is always given: the manifest's
        raise ValueError("ShardSet needs the manifest's digest")

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile, sort_keys=True)}


def source_for(location: str) -> DatasetSource:
    location = str(location)
    if location.startswith(("http://", "https://")):
        return HTTPDatasetSource(url=location)
    return ShardLocation(location)


def dataset_input(name: str, location: str, manifest_sha256: str, profile: dict[str, Any],
                  context: str) -> DatasetInput:
    """The MLflow input for one shard set (see the module docstring); what mlflow.log_input(dataset,
    context=...) would send, for an explicit client."""
    if context not in CONTEXTS:
        raise ValueError(f"dataset context {context!r}: expected one of {list(CONTEXTS)}")
    dataset = ShardSet(source_for(location), name, manifest_sha256[:DIGEST_CHARS], profile)
    entity = DatasetEntity(**{k: v for k, v in dataset.to_dict().items()
                              if k in ("name", "digest", "source_type", "source", "schema", "profile")})
    return DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, context)])


def input_context(dataset_input: DatasetInput) -> str | None:
    return next((t.value for t in dataset_input.tags if t.key == CONTEXT_TAG), None)
