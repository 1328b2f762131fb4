"""The command-line tools: installable as a wheel whose console scripts work from any folder, recipes
by name, logging configured by the entry points, and the launch/ wrappers as thin as promised."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, check_machine, load_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPTS = {"reid-train": "pipeline.cli.train:main", "reid-evaluate": "pipeline.cli.evaluate:main",
           "reid-prepare": "pipeline.cli.prepare:main", "reid-synth": "pipeline.cli.synth:main",
           "reid-compare": "pipeline.cli.compare:main", "reid-export": "pipeline.cli.export:main",
           "reid-demo": "pipeline.cli.demo:main", "reid-ablate": "pipeline.cli.ablate:main"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_console_scripts_that_work_from_any_folder(tmp_path):
    """Build the wheel from the checkout, check its entry points and recipes, install it into a folder
    of its own and run `reid-train --help` and `reid-evaluate --help` from elsewhere with that copy."""
    # From a copy of what the build reads: setuptools leaves build/ and *.egg-info in the source tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    proc = subprocess.run([PY, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheels)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = wheels.glob("alignedreid_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text, text
    assert {f"pipeline/recipes/{name}.yaml" for name in ("demo", "market1501", "deepspeed_zero2")} <= names
    assert "pipeline/cli/train.py" in names and not any(n.startswith(("launch/", "tests/")) for n in names)

    target = tmp_path / "installed"
    proc = subprocess.run([PY, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(PYTHONPATH=str(target))          # the installed copy, not this checkout
    for script in ("reid-train", "reid-evaluate"):
        proc = subprocess.run([str(target / "bin" / script), "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and f"usage: {script}" in proc.stdout, proc.stderr[-3000:]
    proc = subprocess.run([PY, "-c", "import pipeline, pipeline.recipes as r; print(pipeline.__file__); "
                           "print(r.path('demo'))"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=60)
    module, recipe = proc.stdout.split()
    assert Path(module).is_relative_to(target) and Path(recipe).is_relative_to(target), proc.stdout


def test_recipes_by_name():
    assert load_config("demo") == load_config(ROOT / "configs" / "demo.yaml")
    assert load_config("market1501.yaml").model.backbone == "resnet50"
    with pytest.raises(ConfigError, match="nor a shipped recipe of that name: cuhk03np, deepspeed_zero2, demo"):
        load_config("market")


def test_missing_deepspeed_is_a_config_error_naming_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg = load_config("deepspeed_zero2")
    with pytest.raises(ConfigError, match=r"pip install --no-build-isolation deepspeed"):
        check_machine(cfg, cuda_available=True)
    check_machine(load_config("market1501"), cuda_available=True)


def without(packages: list[str], module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`module`'s main(args) in a fresh interpreter where `packages` are absent: sys.modules[name] =
    None makes `import name` raise ModuleNotFoundError and importlib.util.find_spec(name) return None,
    as when the package is not installed (nothing of the code under test is replaced)."""
    code = (f"import sys\nfor name in {packages!r}:\n    sys.modules[name] = None\n"
            f"from {module} import main\nsys.exit(main({args!r}))\n")
    return subprocess.run([PY, "-c", code], cwd=cwd, env=_env(PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=150)


@pytest.mark.timeout(160)
def test_export_without_its_extra_says_which_extra_to_install(tmp_path):
    proc = without(["onnxscript"], "pipeline.cli.export",
                   ["--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "m.onnx")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr
    assert "export error: ONNX export needs onnxscript" in proc.stderr
    assert "pip install 'alignedreid-pipeline[export]'" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.timeout(160)
def test_deepspeed_engine_without_deepspeed_says_how_to_install_it(tmp_path):
    proc = without(["deepspeed"], "pipeline.cli.train",
                   ["--config", "test", "engine.backend=deepspeed", f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "config error: 'engine.backend' is deepspeed, which is not installed" in proc.stderr
    assert "'alignedreid-pipeline[deepspeed]'" in proc.stderr


@pytest.mark.timeout(180)
def test_training_logs_the_pretrained_report_on_stderr(tiny_shards, tmp_path):
    """Logging is configured by the entry point: the pretrained-weights INFO report reaches stderr,
    with the rank prefix."""
    from pipeline.model.backbone import ResNet

    weights = tmp_path / "resnet18-local.pth"
    torch.save(ResNet("resnet18").state_dict(), weights)
    cmd = [PY, "-m", "pipeline.cli.train", "--config", "test", f"data.shards={tiny_shards}",
           f"output_dir={tmp_path / 'run'}", "tracking.enabled=false", f"model.pretrained={weights}",
           "train.epochs=1", "train.steps_per_epoch=1", "eval.final=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"[rank 0] INFO pipeline.model.pretrained: pretrained weights from {weights}: " in proc.stderr


def test_launch_scripts_are_thin_wrappers():
    for script in sorted((ROOT / "launch").glob("*.py")):
        text = script.read_text()
        assert "from pipeline.cli." in text and len(text.splitlines()) <= 12, script.name
