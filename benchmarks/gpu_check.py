"""One command for the first GPU machine: train the shipped Market recipe (DDP, then DeepSpeed ZeRO-2) on
a synthetic set made on the spot, and time Market-size evaluation on the GPU.

What it does, in order (every part is bounded by a timeout, and a part that fails is reported in the
JSON, not raised):

1. Data: a synthetic set in Market layout (`make_synthetic`, 96 identities x ~16 images at 256x128 by
   default) packed with `write_shards` into a temporary directory. No dataset and no network needed.
2. FLOPs per training image: forward + backward of the AlignedReID model of the recipe (ResNet-50,
   last stride 1, its heads) counted with `torch.utils.flop_counter.FlopCounterMode` on a small batch
   (meta tensors: no compute, the count of a real run). references.md: ~24.3 GFLOP for the trunk.
3. DDP: `configs/market1501.yaml` as shipped (ResNet-50, 256x128, P x K 16x4 per GPU, bf16,
   channels_last, nccl) under `torchrun --standalone --nproc-per-node <--gpus>`, overriding only the
   data location, the output dir, tracking (off), `model.pretrained=null` (no network: random
   initialisation, which does not change the speed), evaluation (off) and the length (`--steps` steps in
   one epoch). From train_log.jsonl: images/s per GPU (mean of the per-step figure over the steps after
   `--warmup`, and the wall-clock figure from the step timestamps), the data-wait, loss-communication and
   loss shares, and the model-FLOPs utilisation MFU = FLOPs/image x images/s per GPU / dense bf16 peak.
4. DeepSpeed: the same with `configs/deepspeed_zero2.yaml` (ZeRO-2, bf16 via DeepSpeed's torch_autocast).
   If DeepSpeed cannot start (no compiler for an op, ...) its error text goes into the JSON.
5. Evaluation at Market size (3,368 queries x 15,913 gallery, 751 identities + 17.6 % distractors),
   features made up (identity centre + noise, L2-normalised: 2048-d global, 16 x 128 stripes as the
   model gives at 256x128): `local_distance` alone, `feature_distance` (global, global+local) and
   `rank_metrics_from_features` (global, global+local) on the GPU, each with its peak GPU memory.
   The metrics run where pipeline.evaluation.metrics puts the features (reported as
   `eval.metrics_device`); when that is the CPU, global+local is timed on the first `--gl-queries`
   queries and scaled to all of them (marked in the JSON).

A readable summary goes to stderr; the LAST line of stdout is one JSON object with every figure
(`mode`: "cuda" or "smoke"). Exit status: 0 when the check ran (a DeepSpeed failure is a figure, not a
crash), 1 when the DDP run or the evaluation failed, 2 for bad usage (e.g. no CUDA without --smoke).

    python benchmarks/gpu_check.py                       # on a CUDA machine: all its GPUs, a few minutes
    python benchmarks/gpu_check.py --gpus 1 --steps 40 --warmup 10 --skip-deepspeed
    python benchmarks/gpu_check.py --smoke               # the same code paths at toy size on 2 CPU processes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DDP_RECIPE = ROOT / "configs" / "market1501.yaml"
DEEPSPEED_RECIPE = ROOT / "configs" / "deepspeed_zero2.yaml"
NO_CUDA = "no CUDA device: run with --smoke to check the code paths on CPU"

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity), matched in order against
# torch.cuda.get_device_name(): the first entry whose every word is in the name wins.
PEAK_TFLOPS = [
    (("H200", "NVL"), 835.0, "H200 NVL"),
    (("H200",), 989.0, "H200 SXM (also GH200)"),
    (("H100", "PCIE"), 756.0, "H100 PCIe"),
    (("H100", "NVL"), 835.0, "H100 NVL"),
    (("H100",), 989.0, "H100 SXM"),
    (("A100",), 312.0, "A100"),
    (("L40S",), 362.0, "L40S"),
    (("A10G",), 70.0, "A10G (approximate: lower-clocked A10)"),
    (("4090",), 165.0, "RTX 4090 (bf16 with fp32 accumulate, dense)"),
    (("V100",), 125.0, "V100 (fp16 tensor cores; V100 has no bf16)"),
]
SMOKE_PEAK_TFLOPS = 1.0

# Market-1501 test split: 3,368 queries, 15,913 gallery images (junk excluded) of 751 identities, of
# which 2,793 (17.55 %) are distractors; 6 cameras.
MARKET_QUERIES, MARKET_GALLERY, MARKET_IDS, MARKET_CAMS = 3368, 15913, 751, 6
DISTRACTOR_SHARE = 2793 / 15913
LOCAL_GPU_CHUNK = 1 << 20      # pairs per block for the second local_distance timing (GPU-sized blocks)
GL_QUERIES_ON_CPU = 256        # global+local metrics computed on the CPU: queries timed (then scaled)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
T0 = time.perf_counter()
WHO = "gpu_check"     # "gpu_check eval" in the evaluation child (its clock starts at its own start)


def say(msg: str) -> None:
    print(f"[{WHO} {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def rounded(x, digits: int = 6):
    """JSON-safe float (None for missing or non-finite)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of a child we started (torchrun and its workers), SIGKILL after 20 s."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict, verbose: bool) -> tuple[int | None, str]:
    """Run `cmd` in its own session, its stdout+stderr teed to `log_path` (and to our stderr when
    verbose). Returns (exit status or None on timeout, the output's tail). On timeout the child's whole
    process group gets SIGTERM, then SIGKILL after 20 s."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def pump():
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                if verbose:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rc: int | None = None
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
        except BaseException:   # Ctrl-C: the child runs in its own session and would not see it
            stop_group(proc)
            raise
        finally:
            reader.join(timeout=10)
            proc.stdout.close()
    return rc, tail(log_path.read_text(errors="replace"))


# --------------------------------------------------------------------------------------------------
# Environment and peak
# --------------------------------------------------------------------------------------------------
def environment(smoke: bool) -> dict:
    import platform
    from importlib import metadata

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": None, "nccl": None, "deepspeed": None, "cpu_count": os.cpu_count(),
           "cuda_available": torch.cuda.is_available(), "device_count": 0, "devices": []}
    try:
        env["deepspeed"] = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            nccl = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as exc:  # noqa: BLE001 - informational only
            env["nccl"] = f"unknown ({type(exc).__name__})"
        env["device_count"] = torch.cuda.device_count()
        for i in range(env["device_count"]):
            props = torch.cuda.get_device_properties(i)
            env["devices"].append({"name": torch.cuda.get_device_name(i),
                                   "memory_gib": rounded(props.total_memory / 2 ** 30, 2),
                                   "capability": f"{props.major}.{props.minor}",
                                   "multiprocessors": props.multi_processor_count})
        try:
            env["bf16_supported"] = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:    # older torch: no including_emulation argument
            env["bf16_supported"] = torch.cuda.is_bf16_supported()
    return env


def peak_tflops(env: dict, given: float | None, smoke: bool) -> dict:
    """Dense bf16 peak of one device: --peak-tflops, else the table by device name."""
    if given is not None:
        return {"tflops": given, "source": "--peak-tflops", "device": None, "note": None}
    if smoke:
        return {"tflops": SMOKE_PEAK_TFLOPS, "source": "placeholder (--smoke)", "device": "cpu",
                "note": "a placeholder peak for the smoke run: its MFU means nothing"}
    name = env["devices"][0]["name"] if env["devices"] else ""
    for words, tflops, label in PEAK_TFLOPS:
        if all(w.lower() in name.lower() for w in words):
            note = "V100 has no bf16: peak is fp16 tensor cores" if "V100" in words else None
            return {"tflops": tflops, "source": f"table: {label}", "device": name, "note": note}
    return {"tflops": None, "source": None, "device": name,
            "note": f"unknown device {name!r}: pass --peak-tflops (dense bf16) to get the MFU"}


# --------------------------------------------------------------------------------------------------
# Data and FLOPs
# --------------------------------------------------------------------------------------------------
def make_data(tmp: Path, *, ids: int, images_per_id: int, image_size: tuple[int, int]) -> dict:
    from pipeline.data.datasets import parse_dataset
    from pipeline.data.shards import write_shards
    from pipeline.data.synthetic import make_synthetic

    t0 = time.perf_counter()
    say(f"drawing a synthetic set: {ids} train identities x ~{images_per_id} images at "
        f"{image_size[0]}x{image_size[1]} (+4 test identities)")
    counts = make_synthetic(tmp / "synthetic", train_ids=ids, test_ids=4, seed=0, image_size=image_size,
                            images_per_id=images_per_id, progress=True)
    say("packing shards")
    manifest = write_shards(parse_dataset("market1501", tmp / "synthetic"), tmp / "shards", progress=True)
    return {"shards": str(tmp / "shards"), "train_images": counts["train"], "train_ids": ids,
            "num_classes": int(manifest["num_classes"]), "image_size": list(image_size),
            "seconds": rounded(time.perf_counter() - t0, 2)}


def count_flops(model_cfg, num_classes: int, image_size: list[int], batch: int = 2) -> dict:
    """FLOPs of one training image: forward + backward of the recipe's model in train mode (every head:
    global, local stripes, classifier), counted on meta tensors (shapes only, nothing computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import build_model

    with torch.device("meta"):
        model = build_model(dataclasses.replace(model_cfg, pretrained=None), num_classes)
    model.train()
    x = torch.randn(batch, 3, *image_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        forward = counter.get_total_flops()
        sum(v.float().sum() for v in out.values()).backward()
    total = counter.get_total_flops()
    modules = counter.get_flop_counts()
    backbone = next((sum(v.values()) for k, v in modules.items() if k.endswith(".backbone")), None)
    return {"per_image_gflop": rounded(total / batch / 1e9, 4),
            "forward_per_image_gflop": rounded(forward / batch / 1e9, 4),
            "backbone_per_image_gflop": rounded(backbone / batch / 1e9, 4) if backbone else None,
            "counted_batch": batch, "backbone": model_cfg.backbone, "last_stride": model_cfg.last_stride,
            "image_size": list(image_size), "global_dim": int(out["global"].shape[1]),
            "stripes": int(out["local"].shape[1]), "local_dim": int(out["local"].shape[2])}


# --------------------------------------------------------------------------------------------------
# Training runs (torchrun subprocesses) and what their logs say
# --------------------------------------------------------------------------------------------------
def train_overrides(args, shards: str, out_dir: Path) -> list[str]:
    overrides = [f"data.shards={shards}", f"output_dir={out_dir}", "tracking.enabled=false",
                 "model.pretrained=null", "eval.every_epochs=0", "eval.final=false", "eval.at_start=false",
                 "train.epochs=1", f"train.steps_per_epoch={args.steps}"]
    if args.smoke:   # tiny and CPU-able; bf16 stays (CPU autocast)
        overrides += ["model.backbone=resnet18", f"data.image_size=[{args.image_size[0]},{args.image_size[1]}]",
                      "data.p=4", "data.k=2"]
        if args.num_workers is None:
            overrides.append("data.num_workers=0")
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    return overrides


def train_env(nproc: int, smoke: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1" if smoke else str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def read_log(out_dir: Path) -> list[dict]:
    path = out_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[rec["global_step"]] = rec     # a step logged twice: the last one wins
    return [records[k] for k in sorted(records)]


def figures(records: list[dict], *, warmup: int, images_per_rank_step: int, world: int,
            flops: dict | None, peak: dict) -> dict:
    """Throughput and time shares of the steps after the warm-up, and the MFU."""
    post = [r for r in records if r["global_step"] > warmup]
    if len(post) < 2:
        raise RuntimeError(f"only {len(post)} logged steps after the {warmup} warm-up steps; raise --steps")
    rates = [r["throughput/images_per_s"] / world for r in post]
    out = {"steps_timed": len(post), "warmup_steps": warmup,
           "images_per_step_per_gpu": images_per_rank_step,
           "images_per_s_per_gpu": rounded(mean(rates), 2),
           "images_per_s_per_gpu_median": rounded(statistics.median(rates), 2),
           "images_per_s_per_gpu_min": rounded(min(rates), 2),
           "images_per_s_total": rounded(mean(rates) * world, 2),
           "data_wait_share": rounded(mean(r.get("time/data_wait_share") for r in post), 5),
           "comm_share": rounded(mean(r.get("time/comm_share") for r in post), 5),
           "loss_share": rounded(mean(r.get("time/loss_share") for r in post), 5),
           "loss_first": rounded(records[0].get("loss/total"), 5),
           "loss_last": rounded(records[-1].get("loss/total"), 5),
           "wall_images_per_s_per_gpu": None}
    start = next((r for r in records if r["global_step"] == warmup), None)
    if start is not None and "time" in start and "time" in post[-1]:
        elapsed = post[-1]["time"] - start["time"]
        steps = post[-1]["global_step"] - warmup
        if elapsed > 0:
            out["wall_images_per_s_per_gpu"] = rounded(steps * images_per_rank_step / elapsed, 2)
            out["wall_seconds"] = rounded(elapsed, 3)
    per_image = flops.get("per_image_gflop") if flops else None
    if per_image and peak.get("tflops"):
        scale = per_image * 1e9 / (peak["tflops"] * 1e12)
        out["mfu"] = rounded(out["images_per_s_per_gpu"] * scale, 6)
        out["mfu_wall"] = rounded(out["wall_images_per_s_per_gpu"] * scale, 6) \
            if out["wall_images_per_s_per_gpu"] is not None else None
    else:
        out["mfu"] = out["mfu_wall"] = None
    return out


def train_run(name: str, recipe: Path, args, data: dict, tmp: Path, flops: dict | None, peak: dict) -> dict:
    from pipeline.config import load_config

    out_dir = tmp / name
    overrides = train_overrides(args, data["shards"], out_dir)
    cfg = load_config(recipe, overrides)      # fails here, before any process starts, on a bad override
    result = {"recipe": str(recipe.relative_to(ROOT)), "overrides": overrides, "world_size": args.gpus,
              "engine": cfg.engine.backend, "backbone": cfg.model.backbone,
              "image_size": cfg.data.image_size, "p": cfg.data.p, "k": cfg.data.k,
              "num_workers": cfg.data.num_workers, "amp": cfg.train.amp,
              "channels_last": cfg.train.channels_last,
              "process_group": "none (1 process: no collectives)" if args.gpus == 1
              else ("gloo" if args.smoke else "nccl")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.gpus),
           str(ROOT / "launch" / "train.py"), "--config", str(recipe), *overrides]
    result["command"] = " ".join(cmd)
    unit = ("CPU process" if args.smoke else "GPU") + (("es" if args.smoke else "s") if args.gpus > 1 else "")
    say(f"{name}: training {args.steps} steps of {result['recipe']} on {args.gpus} {unit} (torchrun; "
        f"output in {tmp / (name + '.log')})")
    t0 = time.perf_counter()
    rc, output = run_logged(cmd, tmp / f"{name}.log", args.timeout, train_env(args.gpus, args.smoke), args.verbose)
    result["seconds"] = rounded(time.perf_counter() - t0, 2)
    if rc != 0:
        why = f"timed out after {args.timeout:.0f}s" if rc is None else f"exit status {rc}"
        result["error"] = f"{name} run failed ({why}); output tail:\n{output}"
        say(f"{name}: FAILED ({why})")
        return result
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    result["precision"] = summary.get("precision")
    result["world_size"] = summary.get("world_size", args.gpus)
    result["global_step"] = summary.get("global_step")
    try:
        result.update(figures(read_log(out_dir), warmup=args.warmup, images_per_rank_step=cfg.data.p * cfg.data.k,
                              world=int(result["world_size"]), flops=flops, peak=peak))
    except (RuntimeError, KeyError, ValueError) as exc:
        result["error"] = f"{name}: could not read the figures from {out_dir}/train_log.jsonl: {exc}"
    return result


# --------------------------------------------------------------------------------------------------
# Evaluation at Market size (runs in a child process: its own CUDA context and peak-memory counter)
# --------------------------------------------------------------------------------------------------
def make_eval_inputs(n_q: int, n_g: int, n_ids: int, dim: int, stripes: int, local_dim: int,
                     noise: float = 3.2, seed: int = 0):
    """Market-like labels and features: every identity has queries and gallery images in random cameras,
    DISTRACTOR_SHARE of the gallery are distractors (pid 0); a feature is its identity's centre plus
    noise (a distractor: a centre of its own), L2-normalised (stripes: each stripe)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    q_pids = torch.cat([torch.arange(1, n_ids + 1), torch.randint(1, n_ids + 1, (max(0, n_q - n_ids),), generator=g)])
    q_pids = q_pids[torch.randperm(q_pids.numel(), generator=g)][:n_q]
    n_distract = int(round(DISTRACTOR_SHARE * n_g))
    g_pids = torch.cat([torch.randint(1, n_ids + 1, (n_g - n_distract,), generator=g),
                        torch.zeros(n_distract, dtype=torch.int64)])
    g_pids = g_pids[torch.randperm(n_g, generator=g)]
    q_cams = torch.randint(1, MARKET_CAMS + 1, (n_q,), generator=g)
    g_cams = torch.randint(1, MARKET_CAMS + 1, (n_g,), generator=g)

    def feats(pids: torch.Tensor, shape: tuple[int, ...], centres: torch.Tensor) -> torch.Tensor:
        width = math.prod(shape)
        x = torch.randn((pids.numel(), *shape), generator=g) * (noise / math.sqrt(width))
        known = pids > 0
        x[known] += centres[pids[known]]
        x[~known] += torch.randn((int((~known).sum()), *shape), generator=g) / math.sqrt(width)
        return x

    centres = torch.randn((n_ids + 1, dim), generator=g) / math.sqrt(dim)
    l_centres = torch.randn((n_ids + 1, stripes, local_dim), generator=g) / math.sqrt(stripes * local_dim)
    qf = F.normalize(feats(q_pids, (dim,), centres), dim=1)
    gf = F.normalize(feats(g_pids, (dim,), centres), dim=1)
    ql = F.normalize(feats(q_pids, (stripes, local_dim), l_centres), dim=2)
    gl = F.normalize(feats(g_pids, (stripes, local_dim), l_centres), dim=2)
    return qf, gf, ql, gl, (q_pids, g_pids, q_cams, g_cams)


def eval_child(args) -> int:
    """--part eval: time the evaluation pieces on args.device; figures written to args.out after each."""
    import torch

    from pipeline.alignment import local_distance
    from pipeline.evaluation.metrics import as_tensor, feature_distance, rank_metrics_from_features

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    n_q, n_g = args.eval_size
    n_ids = MARKET_IDS if (n_q, n_g) == (MARKET_QUERIES, MARKET_GALLERY) else \
        max(2, min(n_q, round(MARKET_IDS * n_q / MARKET_QUERIES)))
    result: dict = {"device": str(device), "queries": n_q, "gallery": n_g, "identities": n_ids,
                    "distractors": int(round(DISTRACTOR_SHARE * n_g)), "global_dim": args.global_dim,
                    "stripes": args.stripes, "local_dim": args.local_dim, "parts": {}}

    def save():
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)

    t0 = time.perf_counter()
    qf, gf, ql, gl, labels = make_eval_inputs(n_q, n_g, n_ids, args.global_dim, args.stripes, args.local_dim)
    qf, gf, ql, gl = (t.to(device) for t in (qf, gf, ql, gl))
    result["inputs_seconds"] = rounded(time.perf_counter() - t0, 2)
    # Where the metrics compute: as_tensor is what rank_metrics_from_features applies to its inputs.
    metrics_device = as_tensor(qf[:1], "probe").device
    result["metrics_device"] = str(metrics_device)
    save()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(name: str, fn, scale: float = 1.0, **info):
        """Warm-up on a small slice (kernels, cuBLAS handles), then the timed call on everything. A failure
        (out of memory, say) is recorded for this part and the next parts still run."""
        entry = dict(info)
        try:
            fn(small=True)
            sync()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            value = fn(small=False)
            sync()
            seconds = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            entry["error"] = f"{type(exc).__name__}: {exc}"
            result["parts"][name] = entry
            save()
            say(f"eval: {name}: FAILED: {entry['error']}")
            if cuda:
                torch.cuda.empty_cache()
            return
        entry["seconds"] = rounded(seconds * scale, 6)
        if scale != 1.0:
            entry["measured_seconds"] = rounded(seconds, 6)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            entry["peak_gpu_mem_gib"] = rounded(peak / 2 ** 30, 3)
            entry["extra_gpu_mem_gib"] = rounded((peak - base) / 2 ** 30, 3)
        else:
            entry["peak_gpu_mem_gib"] = entry["extra_gpu_mem_gib"] = None
        if isinstance(value, dict):
            entry.update({k: rounded(value[k], 5) for k in ("rank1", "mAP", "mINP") if k in value})
            entry["valid_queries"] = value.get("valid_queries")
        elif isinstance(value, torch.Tensor):
            entry["shape"] = list(value.shape)
            entry["output_device"] = str(value.device)
        result["parts"][name] = entry
        save()
        say(f"eval: {name}: {entry['seconds']:.3f}s"
            + (f" (scaled from {entry['measured_seconds']:.3f}s)" if scale != 1.0 else "")
            + (f", peak GPU memory {entry['peak_gpu_mem_gib']:.2f} GiB" if cuda else ""))
        del value

    def cut(small: bool) -> tuple[slice, slice]:
        """The warm-up slice (8 queries x 64 gallery items) or everything."""
        return (slice(0, 8), slice(0, 64)) if small else (slice(None), slice(None))

    def local(small: bool, chunk_size: int | None = None):
        rows, cols = cut(small)
        return local_distance(ql[rows], gl[cols], chunk_size=chunk_size)

    def distances(small: bool, distance: str):
        rows, cols = cut(small)
        with_local = distance != "global"
        return feature_distance(qf[rows], gf[cols], x_local=ql[rows] if with_local else None,
                                y_local=gl[cols] if with_local else None, distance=distance)

    q_pids, g_pids, q_cams, g_cams = labels

    def metrics(small: bool, distance: str, n: int):
        # The warm-up keeps the whole gallery (its queries need their matches); n queries timed.
        rows = slice(0, 8 if small else n)
        with_local = (ql[rows], gl) if distance != "global" else None
        return rank_metrics_from_features(qf[rows], gf, q_pids[rows], g_pids, q_cams[rows], g_cams,
                                          distance=distance, local=with_local)

    timed("local_distance", local, chunk_pairs="default")
    timed("local_distance_big_blocks", lambda small: local(small, LOCAL_GPU_CHUNK), chunk_pairs=LOCAL_GPU_CHUNK)
    timed("feature_distance_global", lambda small: distances(small, "global"))
    timed("feature_distance_global+local", lambda small: distances(small, "global+local"))

    timed("rank_metrics_global", lambda small: metrics(small, "global", n_q), computed_on=str(metrics_device))
    # Global+local on the CPU (metrics moved off the GPU) is slow: a share of the queries, scaled.
    if args.gl_queries is not None:
        n_gl = min(n_q, args.gl_queries)
    else:
        n_gl = n_q if metrics_device == device else min(n_q, GL_QUERIES_ON_CPU)
    timed("rank_metrics_global+local", lambda small: metrics(small, "global+local", n_gl), scale=n_q / n_gl,
          computed_on=str(metrics_device), queries_timed=n_gl, scaled_to_all_queries=n_gl != n_q)
    result["seconds"] = rounded(time.perf_counter() - t0, 2)
    save()
    return 0


def eval_part(args, tmp: Path, flops: dict | None) -> dict:
    if flops is None or "stripes" not in flops:
        return {"error": "evaluation skipped: the model's feature shapes are unknown (FLOP count failed)"}
    out = tmp / "eval.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "eval", "--out", str(out),
           "--device", "cpu" if args.smoke else "cuda:0", "--eval-size", *map(str, args.eval_size),
           "--global-dim", str(flops["global_dim"]), "--stripes", str(flops["stripes"]),
           "--local-dim", str(flops["local_dim"])]
    if args.gl_queries is not None:
        cmd += ["--gl-queries", str(args.gl_queries)]
    say(f"evaluation: {args.eval_size[0]} x {args.eval_size[1]} on {'cpu' if args.smoke else 'cuda:0'} "
        f"(made-up features: {flops['global_dim']}-d global, {flops['stripes']} x {flops['local_dim']} stripes)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc, output = run_logged(cmd, tmp / "eval.log", args.eval_timeout, env, verbose=True)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if rc != 0:
        why = f"timed out after {args.eval_timeout:.0f}s" if rc is None else f"exit status {rc}"
        result["error"] = f"evaluation failed ({why}); output tail:\n{output}"
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def fmt(x, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def print_summary(report: dict) -> None:
    env, peak, flops = report["env"], report["peak"], report.get("flops") or {}
    lines = ["", "=" * 78, f"GPU check ({report['mode']}): torch {env['torch']}, CUDA {env['cuda']}, "
             f"{env['device_count']} device(s)"
             + (f": {env['devices'][0]['name']}, {env['devices'][0]['memory_gib']} GiB" if env["devices"] else "")]
    lines.append(f"peak (dense bf16): {fmt(peak.get('tflops'), '.0f', ' TFLOPS')} [{peak.get('source')}]"
                 + (f" - {peak['note']}" if peak.get("note") else ""))
    if "error" in flops:
        lines.append(f"FLOPs: {flops['error']}")
    else:
        lines.append(f"FLOPs per training image: {fmt(flops.get('per_image_gflop'), '.2f')} GFLOP "
                     f"(forward {fmt(flops.get('forward_per_image_gflop'), '.2f')}, trunk "
                     f"{fmt(flops.get('backbone_per_image_gflop'), '.2f')}; references.md: ~24.3 for the "
                     "ResNet-50 trunk at 256x128, last stride 1)")
    for name in ("ddp", "deepspeed"):
        r = report.get(name) or {}
        if "error" in r or "skipped" in r:
            first = (r.get("error") or r.get("skipped")).splitlines()[0]
            lines.append(f"{name:9s}: {first}")
            continue
        lines.append(f"{name:9s}: {fmt(r.get('images_per_s_per_gpu'), '.0f')} img/s per GPU (step mean; "
                     f"wall clock {fmt(r.get('wall_images_per_s_per_gpu'), '.0f')}), MFU "
                     f"{fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', '%')}, data wait "
                     f"{fmt(None if r.get('data_wait_share') is None else 100 * r['data_wait_share'], '.1f', '%')}, "
                     f"loss comm {fmt(None if r.get('comm_share') is None else 100 * r['comm_share'], '.1f', '%')}, "
                     f"precision {(r.get('precision') or {}).get('observed_forward_dtype')}")
    ev = report.get("eval") or {}
    if ev.get("parts"):
        lines.append(f"evaluation {ev['queries']} x {ev['gallery']} on {ev['device']} "
                     f"(metrics computed on {ev.get('metrics_device')}):")
        for name, part in ev["parts"].items():
            if "error" in part:
                lines.append(f"  {name:30s} FAILED: {part['error'].splitlines()[0]}")
                continue
            lines.append(f"  {name:30s} {fmt(part['seconds'], '.3f', ' s')}"
                         + (" (scaled)" if part.get("scaled_to_all_queries") else "")
                         + (f", peak {fmt(part['peak_gpu_mem_gib'], '.2f', ' GiB')}" if part.get("peak_gpu_mem_gib") is not None else "")
                         + (f", mAP {part['mAP']:.3f}" if part.get("mAP") is not None else ""))
    if "error" in ev:
        lines.append("evaluation: " + ev["error"].splitlines()[0])
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    lines.append(f"total {report['seconds']:.0f} s")
    lines.append("=" * 78)
    print("\n".join(lines), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="the same code paths at toy size on CPU (2 gloo processes, ResNet-18 at 64x32, "
                         "P x K 4x2, no workers, 50 x 200 evaluation): no CUDA needed, 1-2 min on 2 busy cores")
    ap.add_argument("--gpus", type=int, default=None,
                    help="processes for torchrun, one GPU each (default: every visible GPU; --smoke: 2 CPU processes)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 60; --smoke 6)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="first steps left out of the averages (default 10; --smoke 2)")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="data.num_workers per rank (default: as the recipe ships, 4; --smoke 0)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of one device in TFLOPS (default: from a table by device name; "
                         f"--smoke: a {SMOKE_PEAK_TFLOPS} placeholder)")
    ap.add_argument("--ids", type=int, default=None, help="synthetic train identities (default 96; --smoke 20)")
    ap.add_argument("--images-per-id", type=int, default=None, help="(default 16; --smoke 8)")
    ap.add_argument("--eval-size", type=int, nargs=2, metavar=("QUERIES", "GALLERY"), default=None,
                    help=f"evaluation size (default Market-1501: {MARKET_QUERIES} {MARKET_GALLERY}; --smoke 50 200)")
    ap.add_argument("--gl-queries", type=int, default=None,
                    help="time the global+local metrics on the first N queries and scale to all (default: "
                         f"all when the metrics run on the evaluation device, {GL_QUERIES_ON_CPU} when "
                         "pipeline.evaluation.metrics moves the features to the CPU)")
    ap.add_argument("--skip-deepspeed", action="store_true", help="leave out the DeepSpeed run")
    ap.add_argument("--skip-eval", action="store_true", help="leave out the evaluation timings")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per training run (default 600; --smoke 240)")
    ap.add_argument("--eval-timeout", type=float, default=None,
                    help="seconds for the evaluation part (default 600; --smoke 240)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, runs)")
    ap.add_argument("--verbose", action="store_true", help="stream the training runs' output to stderr")
    # The evaluation child (run by this script in a subprocess).
    ap.add_argument("--part", choices=["eval"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--global-dim", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stripes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--local-dim", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    smoke = args.smoke
    defaults = {"steps": (60, 6), "warmup": (10, 2), "ids": (96, 20), "images_per_id": (16, 8),
                "eval_size": ([MARKET_QUERIES, MARKET_GALLERY], [50, 200]), "timeout": (600.0, 240.0),
                "eval_timeout": (600.0, 240.0)}
    for key, (cuda_value, smoke_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke_value if smoke else cuda_value)
    args.image_size = (64, 32) if smoke else (256, 128)
    if args.part is None:
        if args.warmup < 1 or args.steps < args.warmup + 2:
            ap.error(f"--steps {args.steps} --warmup {args.warmup}: need --warmup >= 1 and at least 2 steps after it")
        if args.gpus is not None and args.gpus < 1:
            ap.error("--gpus must be >= 1")
        if args.ids < 16 and not smoke:
            ap.error("--ids must be at least P = 16 for the Market recipe")
        if min(args.eval_size) < 1 or (args.gl_queries is not None and args.gl_queries < 1):
            ap.error("--eval-size and --gl-queries must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global WHO
    args = parse(argv)
    if args.part == "eval":
        WHO = "gpu_check eval"
        return eval_child(args)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.gpus is None:
        args.gpus = 2 if args.smoke else torch.cuda.device_count()
    if not args.smoke and args.gpus > torch.cuda.device_count():
        print(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA device(s) visible", file=sys.stderr)
        return 2

    report: dict = {"mode": "smoke" if args.smoke else "cuda", "notes": [], "problems": []}
    report["env"] = environment(args.smoke)
    report["peak"] = peak_tflops(report["env"], args.peak_tflops, args.smoke)
    report["notes"].append("model.pretrained=null: random initialisation (no network on the GPU machine); "
                           "the speed is the same as from ImageNet weights")
    report["notes"].append("comm_share/loss_share come from the trainer's host clock around the gather "
                           "and the loss (no device synchronisation there): on CUDA a lower bound")
    if args.smoke:
        report["notes"].append("smoke: toy sizes on CPU, figures only show that the code paths run")
    if report["peak"].get("note"):
        report["notes"].append(report["peak"]["note"])
    if report["env"].get("bf16_supported") is False:
        report["notes"].append("this GPU has no native bf16: the recipes' bf16 runs emulated")

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if args.keep:
        report["workdir"] = str(tmp)
        say(f"working in {tmp} (kept: --keep)")
    try:
        run_parts(args, report, tmp)
    except Exception as exc:  # noqa: BLE001 - the JSON line must come out whatever happened
        import traceback

        report["problems"].append(f"the check itself failed: {type(exc).__name__}: {exc}")
        report["traceback"] = tail(traceback.format_exc())
    finally:
        report["seconds"] = rounded(time.perf_counter() - T0, 1)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    for key in ("data", "flops", "ddp", "deepspeed", "eval"):
        report.setdefault(key, {"error": "not reached (see problems)"})
    print_summary(report)
    print(json.dumps(report), flush=True)
    failed = (any("error" in report[key] for key in ("data", "ddp", "eval")) or "traceback" in report
              or any("error" in part for part in report["eval"].get("parts", {}).values()))
    return 1 if failed else 0


def run_parts(args, report: dict, tmp: Path) -> None:
    report["data"] = make_data(tmp, ids=args.ids, images_per_id=args.images_per_id, image_size=args.image_size)

    from pipeline.config import load_config

    ddp_cfg = load_config(DDP_RECIPE, train_overrides(args, report["data"]["shards"], tmp / "ddp"))
    try:
        say(f"counting FLOPs: {ddp_cfg.model.backbone}, last stride {ddp_cfg.model.last_stride}, "
            f"{ddp_cfg.data.image_size[0]}x{ddp_cfg.data.image_size[1]}")
        report["flops"] = count_flops(ddp_cfg.model, report["data"]["num_classes"], ddp_cfg.data.image_size)
        say(f"FLOPs per training image: {report['flops']['per_image_gflop']:.2f} GFLOP")
    except Exception as exc:  # noqa: BLE001 - reported; the MFU is then null
        report["flops"] = {"error": f"{type(exc).__name__}: {exc}"}
        report["problems"].append(f"FLOP count failed: {exc}")
    flops = report["flops"] if "error" not in report["flops"] else None

    report["ddp"] = train_run("ddp", DDP_RECIPE, args, report["data"], tmp, flops, report["peak"])
    if "error" in report["ddp"]:
        report["problems"].append(report["ddp"]["error"].splitlines()[0])
    if args.skip_deepspeed:
        report["deepspeed"] = {"skipped": "--skip-deepspeed"}
    else:
        report["deepspeed"] = train_run("deepspeed", DEEPSPEED_RECIPE, args, report["data"], tmp, flops,
                                        report["peak"])
        if "error" in report["deepspeed"]:
            report["problems"].append(report["deepspeed"]["error"].splitlines()[0])
            if args.gpus == 1 and "Distributed backend is not initialized" in report["deepspeed"]["error"]:
                report["problems"].append(
                    "DeepSpeed with ONE process fails in the trainer: with world size 1 no process group is "
                    "initialised, and deepspeed.initialize(dist_init_required=False) requires one (the "
                    "same with --smoke --gpus 1); the engine has to create a single-rank group first")
    if args.skip_eval:
        report["eval"] = {"skipped": "--skip-eval"}
        return
    report["eval"] = ev = eval_part(args, tmp, flops)
    if "error" in ev:
        report["problems"].append(ev["error"].splitlines()[0])
    for name, part in ev.get("parts", {}).items():
        if "error" in part:
            report["problems"].append(f"evaluation part {name} failed: {part['error']}")
    if ev.get("metrics_device") and ev.get("metrics_device") != ev.get("device"):
        timed_q = ev.get("parts", {}).get("rank_metrics_global+local", {}).get("queries_timed")
        report["notes"].append(
            f"rank_metrics_from_features computes on {ev['metrics_device']} although the features are on "
            f"{ev.get('device')} (pipeline.evaluation.metrics.as_tensor moves them there); its global+local "
            f"time is scaled from {timed_q} queries")


if __name__ == "__main__":
    sys.exit(main())
