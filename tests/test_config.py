"""Config loading: YAML + dotted overrides into the typed schema, and errors that say what to fix."""
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.p >= 2 and cfg.data.k >= 2


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["data.p=8", "train.lr=3e-4", "data.image_size=[128,64]", "loss.margin=null",
                             "engine.deepspeed.zero_optimization.stage=2", "tracking.run_name=abc"])
    assert cfg.data.p == 8 and isinstance(cfg.data.p, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.image_size == [128, 64]
    assert cfg.loss.margin is None
    assert cfg.engine.deepspeed["zero_optimization"]["stage"] == 2
    assert cfg.flat()["data.p"] == 8


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  p: 6\n  k: 3\ntrain:\n  epochs: 4\n")
    cfg = load_config(path, ["train.epochs=5"])
    assert (cfg.data.p, cfg.data.k, cfg.train.epochs) == (6, 3, 5)


@pytest.mark.parametrize("override, fragment", [
    (["data.pp=3"], "Did you mean 'data.p'"),
    (["trian.lr=1"], "Did you mean 'train'"),
    (["data.p=abc"], "'data.p': expected an integer"),
    (["data.k=1"], "'data.k' is 1"),
    (["data.p=1"], "'data.p' is 1"),
    (["data.image_size=[250,128]"], "divisible by the backbone stride 16"),
    (["model.last_stride=2", "data.image_size=[256,112]"], "stride 32"),
    (["model.backbone=resnet51"], "Did you mean 'resnet50'"),
    (["engine.backend=horovod"], "must be one of ['ddp', 'deepspeed']"),
    (["loss.margin=-1"], "'loss.margin'"),
    (["loss.mining_ranks=-2"], "'loss.mining_ranks' is -2"),
    (["train.lr=0"], "'train.lr'"),
    (["data.p"], "expected key.sub=value"),
    (["data=3"], "must be a mapping"),
    (["train.lr.x=3"], "is a value, not a section"),
    (["engine.backend=deepspeed", "train.nan_policy=skip"], "'train.nan_policy' is skip"),
    (["engine.backend=deepspeed", "engine.deepspeed.zero_optimization.stage=3"],
     "'engine.deepspeed.zero_optimization.stage' is 3"),
    (["train.deterministic=true"], "unknown key 'train.deterministic'"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  shard: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.shard'. Did you mean 'data.shards'"):
        load_config(path)


def test_missing_and_unsafe_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_tracking_tags_from_overrides():
    """tracking.tags: a flow mapping or dotted keys, nested keys flattened with dots (as the trainer
    tags its MLflow run); a value that is not a scalar is refused naming the tag."""
    cfg = load_config(None, ['tracking.tags={"mlflow.parentRunId": "abc", "ablation.seed": 0}'])
    assert cfg.tracking.tags == {"mlflow.parentRunId": "abc", "ablation.seed": 0}
    assert cfg.flat()["tracking.tags.mlflow.parentRunId"] == "abc"
    assert load_config(None, ["tracking.tags.ablation.variant=global"]).tracking.tags == {
        "ablation": {"variant": "global"}}
    assert load_config(None).tracking.tags == {}
    with pytest.raises(ConfigError, match=r"tracking\.tags\.x' is \[1, 2\]"):
        load_config(None, ["tracking.tags.x=[1, 2]"])
