"""Checkpoint files: atomic publish, rotation, digest verification, fallback, and a real full disk."""
import os
import subprocess
import uuid
import warnings

import pytest
import torch

from pipeline.engine.checkpoint import (CheckpointError, CheckpointManager, checkpoint_name,
                                        load_checkpoint_file)


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
