"""Side effects of one ablation run: the synthetic data, the training subprocess and the tests of its model."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from collections.abc import Callable

from pipeline.config import Config
from pipeline.fileio import atomic_write

from .options import (FAILURE_TAIL_LINES, HEARTBEAT_S, TEST_VARIANTS, TRAIN_SCRIPT, AblationError, TrainingFailed,
                      differences)


def prepare_synthetic(folder: Path, level: float, *, train_ids: int, test_ids: int, seed: int,
                      image_size: tuple[int, int], log: Callable[[str], None]) -> Path:
    """Shards of the embedded synthetic data set at misalignment `level` in folder/shards, drawn once
    and reused (folder/data.json records how; a different request for the same folder is refused).
    Written under a temporary name first, so an interrupted draw is never mistaken for a finished one."""
    spec = {"misalign": level, "train_ids": train_ids, "test_ids": test_ids, "data_seed": seed,
            "image_size": list(image_size)}
    shards = folder / "shards"
    stored = folder / "data.json"
    if stored.is_file() and (shards / "manifest.json").is_file():
        old = json.loads(stored.read_text())
        diff = differences(old, spec)
        if diff:
            raise AblationError(f"{folder} holds synthetic data drawn differently ({'; '.join(diff)}); "
                                "use another --out, or the same --train-ids/--test-ids/--data-seed/--image-size")
        return shards
    from pipeline.data.datasets import parse_dataset
    from pipeline.data.shards import write_shards
    from pipeline.data.synthetic import make_synthetic

    t0 = time.monotonic()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_synthetic(tmp / "raw", train_ids=train_ids, test_ids=test_ids, seed=seed, image_size=image_size,
                       misalign=level, progress=False)
        write_shards(parse_dataset("market1501", tmp / "raw"), tmp / "shards", progress=False)
    except ValueError as exc:
        raise AblationError(f"synthetic data at misalignment {level:g}: {exc}") from None
    shutil.rmtree(tmp / "raw")           # the shards hold the original JPEG bytes
    atomic_write(tmp / "data.json", json.dumps(spec, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    log(f"drew synthetic data at misalignment {level:g} ({train_ids} train / {test_ids} test ids, "
        f"{image_size[0]}x{image_size[1]}) in {time.monotonic() - t0:.0f}s -> {shards}")
    return shards


def train_command(recipe: Path, nproc: int, overrides: list[str]) -> list[str]:
    """torchrun --standalone with `nproc` processes; one process runs launch/train.py directly."""
    if nproc == 1:
        return [sys.executable, str(TRAIN_SCRIPT), "--config", str(recipe), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(TRAIN_SCRIPT), "--config", str(recipe), *overrides]


def training_env() -> dict[str, str]:
    """The environment of a training subprocess: fresh rendezvous stores per restart round (see
    docs/multinode.md) and unbuffered output so that train.log is current."""
    return dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONUNBUFFERED="1")


def finished_summary(run_dir: Path, epochs: int) -> dict | None:
    """summary.json of a training that ran all `epochs` and whose final checkpoint exists, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if summary.get("epochs_completed", 0) < epochs or not Path(summary.get("checkpoint", "")).is_file():
        return None
    return summary


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _last_step(run_dir: Path) -> str:
    """'epoch 3/16, step 40' from the last line of train_log.jsonl (cheap: reads the tail only)."""
    path = run_dir / "train_log.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            rec = json.loads(f.read().decode(errors="replace").strip().splitlines()[-1])
        return f"epoch {rec['epoch'] + 1}, step {rec['step']}, loss {rec.get('loss/total', float('nan')):.3f}"
    except (OSError, IndexError, KeyError, ValueError):
        return "starting"


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_training(cmd: list[str], run_dir: Path, log: Callable[[str], None],
                 heartbeat_s: float = HEARTBEAT_S) -> float:
    """Run one training to its end, output appended to run_dir/train.log; a progress line every
    `heartbeat_s`. No time limit: a training takes as long as its recipe says. On Ctrl-C the
    training is asked to checkpoint and stop (SIGTERM), so the next run of the command resumes it.
    Returns the elapsed seconds; raises TrainingFailed with the log's tail."""
    log_path = run_dir / "train.log"
    t0 = time.monotonic()
    with open(log_path, "a", buffering=1) as out:
        out.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} $ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=training_env(),
                                stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    code = proc.wait(timeout=heartbeat_s)
                    break
                except subprocess.TimeoutExpired:
                    log(f"    ... {_fmt_s(time.monotonic() - t0)}: {_last_step(run_dir)}")
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    elapsed = time.monotonic() - t0
    if code != 0:
        hint = ("it was preempted (exit 75) after writing a checkpoint; re-run the same command to resume"
                if code == 75 else "fix the cause and re-run the same command: it resumes from the last checkpoint")
        raise TrainingFailed(f"training failed with exit status {code} after {_fmt_s(elapsed)}; {hint}.\n"
                             f"Last lines of {log_path}:\n{_tail(log_path, FAILURE_TAIL_LINES)}\n"
                             f"(full log: {log_path})")
    return elapsed


def cached_forward(net, with_local: bool):
    """`net` (eval forward: `net(x)`, and `net(x, return_local=True)` when `with_local`) with its
    outputs memoised per input batch, keyed by a hash of the batch's bytes.

    Why: the four test variants read the same query and gallery images and feature extraction is
    nearly all of their cost; this way the network runs once per image instead of four times while
    `evaluate` is used unchanged. A batch that differs in any byte is a miss and is simply computed.
    The wrapped network is the attribute `net`, not `module`, so that `evaluate` does not unwrap it."""
    import hashlib

    import torch
    from torch import nn

    class CachedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.cache: dict = {}

        @torch.no_grad()
        def forward(self, images, return_local: bool = False):
            data = images.detach().contiguous().cpu().numpy().tobytes()
            key = (tuple(images.shape), str(images.dtype), hashlib.blake2b(data, digest_size=16).digest())
            hit = self.cache.get(key)
            if hit is None:
                out = self.net(images, return_local=True) if with_local else (self.net(images), None)
                hit = self.cache[key] = tuple(t.cpu() if t is not None else None for t in out)
            if not return_local:
                return hit[0].to(images.device)
            if hit[1] is None:
                raise RuntimeError("cached_forward(..., with_local=False) cannot return local features")
            return hit[0].to(images.device), hit[1].to(images.device)

    return CachedForward()


def evaluate_run(checkpoint: Path, cfg: Config, run_dir: Path, tests: list[str],
               log: Callable[[str], None]) -> dict[str, dict]:
    """The test variants of one trained model: test_<key>.json in run_dir, computed for the missing
    ones (or those of another checkpoint) with pipeline.evaluation.evaluate in this process."""
    results, todo = {}, []
    for key in tests:
        path = run_dir / f"test_{key}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("checkpoint") == str(checkpoint):
                results[key] = stored
                continue
        todo.append(key)
    if not todo:
        return results
    import torch

    from pipeline.data import eval_source
    from pipeline.evaluation import evaluate
    from pipeline.model import model_from_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards = eval_source(cfg.data.shards, cfg.eval.shards, cache_dir=cfg.data.cache_dir)
    model, _ = model_from_checkpoint(checkpoint)
    model = cached_forward(model.to(device).eval(),
                           with_local=any(TEST_VARIANTS[k][1] != "global" for k in todo))
    for key in todo:
        label, distance, rerank = TEST_VARIANTS[key]
        t0 = time.monotonic()
        result = evaluate(model, shards, image_size=tuple(cfg.data.image_size), device=device,
                          distance=distance, rerank=rerank, batch_size=cfg.eval.batch_size,
                          max_rank=cfg.eval.max_rank, output_dir=None, plots=False,
                          num_workers=cfg.data.num_workers, progress=False)
        record = {"test": key, "label": label, "distance": distance, "rerank": rerank,
                  "checkpoint": str(checkpoint),
                  **{k: float(result[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")},
                  "valid_queries": int(result["valid_queries"]),
                  "cmc": [round(float(x), 6) for x in result["cmc"]]}
        atomic_write(run_dir / f"test_{key}.json", json.dumps(record, indent=1) + "\n")
        results[key] = record
        log(f"    test {label:<22} rank-1 {100 * record['rank1']:5.1f}  mAP {100 * record['mAP']:5.1f}  "
            f"mINP {100 * record['mINP']:5.1f}  ({time.monotonic() - t0:.0f}s)")
    return results


def synthetic_level(shards: Path) -> float | None:
    """The misalignment level of shards that `prepare_synthetic` drew (its data.json beside them, as
    `--shards <out>/data/misalign-1/shards` reuses them), else None."""
    try:
        return float(json.loads((shards.parent / "data.json").read_text())["misalign"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_alignment(checkpoint: Path, cfg: Config, run_dir: Path, misalign: float, seed: int,
                      log: Callable[[str], None], pairs: int = 200) -> dict:
    """alignment.json in run_dir: how often the trained model's shortest path matches each stripe to
    the stripe showing the same body part (pipeline.evaluation.alignment_check), on synthetic
    same-person pairs at the run's misalignment, beside an untrained network of the same config
    (seed `seed`) and the plain diagonal. Computed once per checkpoint."""
    path = run_dir / "alignment.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("checkpoint") == str(checkpoint) and stored.get("pairs") == pairs:
            return stored
    import dataclasses

    import torch

    from pipeline.evaluation.alignment_check import alignment_accuracy
    from pipeline.model import build_model, model_from_checkpoint

    t0 = time.monotonic()
    size = tuple(cfg.data.image_size)
    trained, _ = model_from_checkpoint(checkpoint)
    torch.manual_seed(seed)
    untrained = build_model(dataclasses.replace(cfg.model, pretrained=None), num_classes=1)
    record = {"checkpoint": str(checkpoint), "misalign": misalign, "pairs": pairs,
              "trained": alignment_accuracy(trained, size, pairs=pairs, misalign=misalign),
              "untrained": alignment_accuracy(untrained, size, pairs=pairs, misalign=misalign)}
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    log(f"    alignment (path on the true stripe ±1): trained {100 * record['trained']['path']:.1f}%, "
        f"untrained {100 * record['untrained']['path']:.1f}%, diagonal "
        f"{100 * record['trained']['diagonal']:.1f}%  ({time.monotonic() - t0:.0f}s)")
    return record
