"""benchmarks/scaling.py --smoke: W = 1 and 2 gloo processes at toy feature sizes, the former and the
current loss exchange side by side. Here: the last stdout line is the complete JSON object, the plot is
drawn, and at W = 2 the current exchange sends fewer bytes than the former one (counted from the ranks'
own socket writes). About 8 s of CPU time; the generous timeout is for a machine whose cores are busy
with other work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scaling_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # Its own session, so that on a timeout its rank processes go too (not only the parent).
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--timeout", "520"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["worlds"] == [1, 2] and set(result["sizes"]) == {"A", "D", "stripes", "local_dim"}
    rows = {(r["world"], r["setting"], r["method"]): r for r in result["rows"]}
    for row in rows.values():
        assert {"sent_mib", "lo_mib", "counter_mib", "loss_ms", "dp_ms", "dtype"} <= set(row)
        assert row["loss_ms"] > 0
    for setting in ("global", "full", "grouped"):
        old, new = rows[(2, setting, "old")], rows[(2, setting, "new")]
        assert 0 < new["sent_mib"] < old["sent_mib"], setting
        assert 0 < new["counter_mib"] < old["counter_mib"], setting
    assert rows[(1, "full", "new")]["sent_mib"] == 0       # one process sends nothing
    assert rows[(2, "full_bf16", "new")]["sent_mib"] < rows[(2, "full", "new")]["sent_mib"]
    for world in (64, 256):
        for key in ("full/old", "full/new", "full/new mining_ranks=8"):
            assert {"mib", "ms", "share"} == set(result["extrapolated"][f"{world}/{key}"])
    assert Path(result["plot"]).stat().st_size > 10_000
    assert (tmp_path / "scaling.json").exists()
