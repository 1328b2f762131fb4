"""Typed run configuration: YAML (safe_load) -> nested dataclasses, dotted overrides, validation.

One loader for every entry point::

    cfg = load_config("configs/demo.yaml", overrides=["data.p=8", "train.lr=3e-4"])   # or load_config("demo")
    cfg.data.p            # 8
    cfg.to_dict()         # plain nested dict (for MLflow params, checkpoints)

Unknown keys are errors that suggest the closest known key; wrong types and impossible values are
errors naming the key and what would fix it. The YAML-to-dataclass machinery is pipeline/typed_yaml.py;
this module is the schema, the loader and every check (validate: the values; check_machine: this
machine), all run before any process group starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .typed_yaml import ConfigError, build_dataclass, flatten, parse_override, set_dotted

# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    # Shard location(s): a folder, file://, http(s)://, pipe:CMD with {name}, s3:// (pipeline/data/locations.py);
    # a list trains several shard sets as one (pids namespaced per set, labels contiguous over the union).
    shards: str | list[str] = "demo_out/shards"
    cache_dir: str | None = None             # node-local copy of remote shards (downloaded once per node)
    decode_cache: str = "none"               # none | host | device: decode each train image once, keep it
    p: int = 16                              # identities per batch (per rank)
    k: int = 4                               # images per identity
    num_workers: int = 2                     # DataLoader workers per rank
    image_size: list[int] = field(default_factory=lambda: [256, 128])  # [H, W]
    flip_prob: float = 0.5
    pad: int = 10                            # pad then random-crop back to image_size
    erasing_prob: float = 0.5                # random erasing probability (0 disables)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"               # resnet18 | resnet34 | resnet50 | resnet101 | resnext50_32x4d
    last_stride: int = 1                     # 1 (16x8 map at 256x128) or 2 (8x4)
    pretrained: str | None = None            # path or URL of torchvision-named ImageNet weights; null = random init
    neck: bool = True                        # BN neck on the global feature
    local_dim: int = 128
    stripe_pool: str = "avg"                 # avg | max (pooling over the width)
    # pool-conv-bn-relu (reproduction) | bn-relu-pool-conv (AlignedReID++) | pool-conv-bn (whitened, signed)
    local_head: str = "pool-conv-bn-relu"
    local_normalize: bool = False            # L2-normalise each stripe feature (train and test)
    # Scale gamma of the stripe BN at initialisation (of the pool-conv-bn-relu head; the other heads have
    # no stripe scale and ignore it): one (PyTorch >= 1.0: stripes
    # start ~9 apart, where tanh(d/2) is flat and the branch never learns) | uniform (U(0, 1), PyTorch
    # 0.3's default, what the reproduction really ran) | unit-distance (unrelated stripes start 1 apart)
    local_bn_init: str = "unit-distance"
    # Keep the stripe BN's scale and shift at their initial values (pool-conv-bn-relu): the stripes'
    # spread over the batch is then fixed, so the local triplet loss cannot shrink them all together.
    local_bn_fixed: bool = False
    # An identity classifier on every stripe (one linear layer shared by all stripes; trained with
    # loss.local_id_weight): each stripe must tell people apart by itself, so the stripes cannot
    # collapse onto one point or direction, the cheapest minimum of a batch-hard local triplet loss.
    local_id: bool = False
    sync_bn: bool = False                    # SyncBatchNorm (multi-GPU)


@dataclass
class LossConfig:
    margin: float | None = 0.3               # null -> soft-margin triplet
    global_weight: float = 1.0
    local_weight: float = 1.0
    id_weight: float = 1.0
    local_id_weight: float = 1.0             # the stripes' identity loss, with model.local_id (mean over stripes)
    label_smoothing: float = 0.1
    local_warmup_epochs: float = 0.0         # ramp the local loss weight linearly from 0 over these epochs
    local_mining: str = "global"             # global (the paper) | local: the distance that mines local triplets
    mutual_prob_weight: float = 1.0          # used when mutual.enabled
    mutual_metric_weight: float = 1.0        # used when mutual.enabled
    mining_ranks: int = 0                    # mine/align within groups of this many consecutive ranks; 0 = all


@dataclass
class MutualConfig:
    enabled: bool = False                    # train two models together (deep mutual learning)


@dataclass
class TrainConfig:
    epochs: int = 120
    steps_per_epoch: int | None = None       # null -> fixed by the shard manifest
    optimizer: str = "adam"                  # adam | sgd
    lr: float = 2e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    scheduler: str = "exp"                   # exp | step | cosine | constant
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.01
    decay_start_epoch: int = 60              # exp: decay from here to lr * final_lr_factor at the end
    final_lr_factor: float = 0.001
    milestones: list[int] = field(default_factory=lambda: [40, 70])  # step scheduler
    gamma: float = 0.1
    grad_clip: float | None = None           # max global grad norm; null disables
    amp: str = "none"                        # none | bf16 | fp16 (GPU)
    channels_last: bool = False
    nan_policy: str = "stop"                 # stop | skip
    log_every: int = 10                      # steps between progress/metric updates


@dataclass
class EngineConfig:
    backend: str = "ddp"                     # ddp | deepspeed
    dist_backend: str = "auto"               # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    timeout_s: int = 600                     # collective timeout
    deepspeed: dict = field(default_factory=lambda: {
        "zero_optimization": {"stage": 1},
        "gradient_accumulation_steps": 1,
    })


@dataclass
class CheckpointConfig:
    every_steps: int = 500                   # 0 disables step checkpoints (epoch ends still save)
    keep_last: int = 3
    resume: bool = True                      # resume from <output_dir>/checkpoints/latest


@dataclass
class EvalConfig:
    shards: int | str | None = None          # set to evaluate: index into data.shards or a location; null = the first
    every_epochs: int = 10                   # 0 disables evaluation during training
    at_start: bool = False                   # also evaluate the initial model (a baseline to beat)
    final: bool = True                       # evaluate after the last epoch
    distance: str = "global"                 # global | local | global+local (common scale) | global+local-sum
    rerank: bool = False
    batch_size: int = 128
    max_rank: int = 50
    plots: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None                   # null -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "alignedreid"
    run_name: str | None = None
    system_metrics: bool = False
    log_model: bool = True                   # the trained network as the run's MLflow model
    register_as: str | None = None           # also a new version of this registered model per run
    timeout_s: float = 10.0                  # bound on any single call to the tracking server
    tags: dict = field(default_factory=dict)  # extra run tags, e.g. {"mlflow.parentRunId": ID} nests the run


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """tracking.uri if set, else $MLFLOW_TRACKING_URI, else MLflow's embedded sqlite:///mlflow.db.

    The rule for every reader of the store (tracker, reid-compare, FeatureExtractor for runs:/ URIs);
    here, below them all, so none of them imports another for it."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "outputs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mutual: MutualConfig = field(default_factory=MutualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. {'data.p': 16, ...} (for MLflow params)."""
        return flatten(self.to_dict())


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")
CHOICES = {
    "model.backbone": BACKBONES,
    "model.stripe_pool": ("avg", "max"),
    "model.local_head": ("pool-conv-bn-relu", "bn-relu-pool-conv", "pool-conv-bn"),
    "model.local_bn_init": ("one", "uniform", "unit-distance"),
    "loss.local_mining": ("global", "local"),
    "model.last_stride": (1, 2),
    "train.optimizer": ("adam", "sgd"),
    "train.scheduler": ("exp", "step", "cosine", "constant"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.nan_policy": ("stop", "skip"),
    "engine.backend": ("ddp", "deepspeed"),
    "engine.dist_backend": ("auto", "gloo", "nccl"),
    "eval.distance": ("global", "local", "global+local", "global+local-sum"),
    "data.decode_cache": ("none", "host", "device"),
}


def resolve_recipe(path: str | Path) -> Path:
    """A config file: `path` itself when it exists, else the shipped recipe of that name (`demo`,
    `market1501.yaml`, ...; pipeline/recipes, which a source checkout also has as configs/)."""
    from . import recipes

    if Path(path).is_file():
        return Path(path)
    shipped = recipes.path(str(path))
    if shipped is None:
        raise ConfigError(f"config file not found: {path} (nor a shipped recipe of that name: "
                          f"{', '.join(recipes.names())})")
    return shipped


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config from a YAML file (or a shipped recipe's name) with `key.sub=value` overrides, checked
    by validate."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        path = resolve_recipe(path)
        source = str(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(Config, tree, key, value, f"override '{text}'")
    cfg = build_dataclass(Config, tree, "", source)
    validate(cfg, source)
    return cfg


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    cfg = build_dataclass(Config, tree, "", source)
    validate(cfg, source)
    return cfg


def backbone_stride(last_stride: int) -> int:
    return 16 if last_stride == 1 else 32


def validate(cfg: Config, source: str = "<config>") -> None:
    """Every check of the values, each key alone and across keys (load_config runs it, before any process
    group starts); raises ConfigError naming the key and the fix."""
    def bad(key: str, msg: str):
        raise ConfigError(f"{source}: '{key}' {msg}")

    flat = cfg.flat()
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            close = difflib.get_close_matches(str(flat[key]), [str(a) for a in allowed], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            bad(key, f"is {flat[key]!r}; must be one of {list(allowed)}.{hint}")
    d = cfg.data
    if isinstance(d.shards, list) and not d.shards:
        bad("data.shards", "is an empty list; give one shard location or a list of them")
    sets = len(d.shards) if isinstance(d.shards, list) else 1
    if isinstance(cfg.eval.shards, int) and not 0 <= cfg.eval.shards < sets:
        bad("eval.shards", f"is {cfg.eval.shards}, but data.shards has {sets} set(s): use 0..{sets - 1}, "
            "a location, or null for the first set")
    if d.p < 2:
        bad("data.p", f"is {d.p}; batch-hard mining needs at least 2 identities per batch")
    if d.k < 2:
        bad("data.k", f"is {d.k}; batch-hard mining needs at least 2 images per identity (a positive)")
    if d.num_workers < 0:
        bad("data.num_workers", f"is {d.num_workers}; must be >= 0")
    if len(d.image_size) != 2 or min(d.image_size) <= 0:
        bad("data.image_size", f"is {d.image_size}; expected [height, width] with positive values")
    stride = backbone_stride(cfg.model.last_stride)
    if any(s % stride for s in d.image_size):
        bad("data.image_size", f"is {d.image_size}; with model.last_stride={cfg.model.last_stride} both "
            f"sides must be divisible by the backbone stride {stride} (e.g. [256, 128])")
    for key in ("data.flip_prob", "data.erasing_prob", "loss.label_smoothing"):
        if not 0.0 <= flat[key] <= 1.0:
            bad(key, f"is {flat[key]}; must be in [0, 1]")
    if d.pad < 0:
        bad("data.pad", f"is {d.pad}; must be >= 0")
    if cfg.loss.margin is not None and cfg.loss.margin <= 0:
        bad("loss.margin", f"is {cfg.loss.margin}; must be > 0, or null for the soft margin")
    for key in ("loss.global_weight", "loss.local_weight", "loss.id_weight", "loss.local_id_weight",
                "loss.mutual_prob_weight", "loss.mutual_metric_weight"):
        if flat[key] < 0:
            bad(key, f"is {flat[key]}; loss weights must be >= 0 (0 disables the term)")
    if cfg.loss.mining_ranks < 0:
        bad("loss.mining_ranks", f"is {cfg.loss.mining_ranks}; must be >= 0 (0 mines over all ranks; N > 0 "
            "within groups of N consecutive ranks, N dividing the world size)")
    if cfg.loss.local_warmup_epochs < 0:
        bad("loss.local_warmup_epochs", f"is {cfg.loss.local_warmup_epochs}; must be >= 0")
    if cfg.model.local_dim <= 0:
        bad("model.local_dim", f"is {cfg.model.local_dim}; must be > 0")
    t = cfg.train
    if t.epochs < 1:
        bad("train.epochs", f"is {t.epochs}; must be >= 1")
    if t.steps_per_epoch is not None and t.steps_per_epoch < 1:
        bad("train.steps_per_epoch", f"is {t.steps_per_epoch}; must be >= 1 or null")
    if t.lr <= 0:
        bad("train.lr", f"is {t.lr}; must be > 0")
    if t.weight_decay < 0:
        bad("train.weight_decay", f"is {t.weight_decay}; must be >= 0")
    if t.warmup_epochs < 0:
        bad("train.warmup_epochs", f"is {t.warmup_epochs}; must be >= 0")
    if t.grad_clip is not None and t.grad_clip <= 0:
        bad("train.grad_clip", f"is {t.grad_clip}; must be > 0 or null")
    if t.log_every < 1:
        bad("train.log_every", f"is {t.log_every}; must be >= 1")
    if cfg.checkpoint.every_steps < 0:
        bad("checkpoint.every_steps", f"is {cfg.checkpoint.every_steps}; must be >= 0")
    if cfg.checkpoint.keep_last < 1:
        bad("checkpoint.keep_last", f"is {cfg.checkpoint.keep_last}; must be >= 1")
    if cfg.eval.every_epochs < 0:
        bad("eval.every_epochs", f"is {cfg.eval.every_epochs}; must be >= 0")
    if cfg.eval.batch_size < 1:
        bad("eval.batch_size", f"is {cfg.eval.batch_size}; must be >= 1")
    if cfg.tracking.timeout_s <= 0:
        bad("tracking.timeout_s", f"is {cfg.tracking.timeout_s}; must be > 0")
    if cfg.engine.backend == "deepspeed":
        if t.nan_policy == "skip":
            bad("train.nan_policy", "is skip, which engine.backend=deepspeed does not support (DeepSpeed "
                "owns the optimiser step); use nan_policy=stop or engine.backend=ddp")
        zero = cfg.engine.deepspeed.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
        if stage not in (0, 1, 2):
            bad("engine.deepspeed.zero_optimization.stage", f"is {stage!r}; supported: 0, 1, 2")
    name = cfg.tracking.register_as
    if name is not None and (not name.strip() or name != name.strip()):
        bad("tracking.register_as", f"is {name!r}; must be a registered model name (non-empty, no "
            f"surrounding spaces) or null")
    if name is not None and not cfg.tracking.log_model:
        bad("tracking.register_as", f"is {name!r} but tracking.log_model is false: only a logged model "
            f"can be registered; set tracking.log_model=true or register_as=null")
    for key, value in flatten(cfg.tracking.tags).items():
        if not isinstance(value, (str, int, float, bool)):
            bad(f"tracking.tags.{key}", f"is {value!r}; a tag value must be a string or a number")


def check_machine(cfg: Config, cuda_available: bool | None = None) -> None:
    """Checks that depend on this machine, not on the file (CUDA, installed engines): run before any
    process group starts. Cross-field checks of the values themselves are validate's."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        if cfg.train.amp == "fp16":
            raise ConfigError("'train.amp' is fp16, which needs a CUDA GPU (float16 training needs a "
                              "GradScaler on the GPU); on this machine set train.amp=bf16 (CPU autocast) "
                              "or train.amp=none")
        if cfg.engine.dist_backend == "nccl":
            raise ConfigError("'engine.dist_backend' is nccl, which needs CUDA GPUs; set "
                              "engine.dist_backend=auto (gloo on CPU) or gloo")
    if cfg.engine.backend == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("'engine.backend' is deepspeed, which is not installed in this environment; "
                              "install it after torch with `pip install --no-build-isolation deepspeed` (or "
                              "`pip install --no-build-isolation 'alignedreid-pipeline[deepspeed]'`), or set "
                              "engine.backend=ddp")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
