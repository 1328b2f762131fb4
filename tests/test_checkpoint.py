"""Checkpoint files: atomic publish, rotation, digest verification, fallback, and a real full disk."""
import os
import subprocess
import uuid
import warnings

import pytest
import torch

from pipeline.checkpoint import (CheckpointError, CheckpointManager, checkpoint_name, evaluated_state_dict,
                                 load_checkpoint_file, read_checkpoint, resolve_checkpoint)
from pipeline.model import model_from_checkpoint


def _state(step, size=16):
    return {"model": {"w": torch.full((size,), float(step))}, "global_step": step, "epoch": 0}


def test_save_load_rotate(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(_state(step), checkpoint_name(0, step))
    assert mgr.names() == [checkpoint_name(0, 2), checkpoint_name(0, 3)]
    assert (tmp_path / "latest").read_text() == checkpoint_name(0, 3)
    state, name = mgr.load_latest()
    assert name == checkpoint_name(0, 3) and state["global_step"] == 3
    assert torch.equal(state["model"]["w"], torch.full((16,), 3.0))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_no_checkpoint_is_none(tmp_path):
    assert CheckpointManager(tmp_path / "empty").load_latest() is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, damage):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(_state(1), checkpoint_name(0, 1))
    path = mgr.save(_state(2), checkpoint_name(0, 2))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"not a checkpoint")
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        state, name = mgr.load_latest()
    assert name == checkpoint_name(0, 1) and state["global_step"] == 1


def test_every_checkpoint_corrupt_is_an_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(_state(1), checkpoint_name(0, 1))
    path.write_bytes(b"xx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            mgr.load_latest()


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / checkpoint_name(0, 1)
    torch.save({"format": "alignedreid-ckpt-v1", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint_file(path)


def test_directories_resolve_and_fall_back_like_the_manager(tmp_path):
    """A run or checkpoints directory: `latest`, else the newest file; a corrupt newest one is skipped
    when read, as a resuming training skips it."""
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=3)
    first = mgr.save(_state(1), checkpoint_name(0, 1))
    second = mgr.save(_state(2), checkpoint_name(0, 2))
    for source in (tmp_path / "run", mgr.dir, second):
        assert resolve_checkpoint(source) == second
    (mgr.dir / "latest").write_text("ckpt-E0009-S000009.pt")          # dangling pointer: newest file
    assert resolve_checkpoint(tmp_path / "run") == second
    second.write_bytes(second.read_bytes()[:100])                       # corrupt: the previous one
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        state, path = read_checkpoint(tmp_path / "run")
    assert path == first and state["global_step"] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "empty")


def test_model_from_checkpoint_verifies_the_digest(tmp_path):
    from pipeline.config import Config
    from pipeline.model import build_model

    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.data.image_size = "resnet18", 2, [64, 32]
    model = build_model(cfg.model, 3)
    path = CheckpointManager(tmp_path).save({"model": model.state_dict(), "config": cfg.to_dict(),
                                             "num_classes": 3, "mutual": False}, checkpoint_name(0, 1))
    _, info = model_from_checkpoint(path)
    assert info["image_size"] == [64, 32] and info["path"] == str(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF                                  # still a readable zip? the digest says no
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        model_from_checkpoint(path)


def test_evaluated_state_dict_takes_the_first_net_of_a_pair():
    w = torch.zeros(1)
    assert evaluated_state_dict({"module.nets.0.a": w, "module.nets.1.a": w}) == ({"a": w}, True)
    assert evaluated_state_dict({"module.a": w}) == ({"a": w}, False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs): writes beyond it fail with ENOSPC like a full disk."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_keeps_previous_checkpoint(tiny_disk):
    mgr = CheckpointManager(tiny_disk / "ckpt", keep_last=3)
    mgr.save(_state(1, size=1000), checkpoint_name(0, 1))            # ~4 KB: fits
    with pytest.raises(CheckpointError) as err:
        mgr.save(_state(2, size=400_000), checkpoint_name(0, 2))      # ~1.6 MB: does not
    message = str(err.value)
    assert "No space left on device" in message
    assert f"previous checkpoint {tiny_disk / 'ckpt' / checkpoint_name(0, 1)} is intact" in message
    assert mgr.names() == [checkpoint_name(0, 1)]
    assert not [p for p in (tiny_disk / "ckpt").iterdir() if ".tmp" in p.name]
    state, name = mgr.load_latest()
    assert name == checkpoint_name(0, 1) and state["global_step"] == 1
