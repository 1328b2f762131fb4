"""A real two-node SLURM cluster on localhost, for tests and for trying the sbatch scripts by hand.

One private ``munged``, one ``slurmctld`` and two ``slurmd -N n1|n2`` daemons, all in the foreground
under this process, with every file (slurm.conf, munge key and socket, state, spools, logs, pids) in one
directory. Nothing under /etc or /var is touched, so it runs beside a system SLURM or another copy of
itself: ports are picked free at start. Both nodes are this machine (``NodeAddr=127.0.0.1``), so they
share the filesystem as cluster nodes share a network filesystem.

    with LocalSlurmCluster(tmp_dir) as cluster:
        job = cluster.sbatch(["--nodes", "2", "launch/slurm/train.sbatch", "--config", ...])
        info = cluster.wait(job, timeout=120)      # scontrol's fields, e.g. info["JobState"]

Command line (the daemons live as long as the command)::

    python tests/slurm/cluster.py DIR           # start, print the SLURM_CONF to export, wait for Ctrl-C

Needs SLURM and MUNGE installed (tests/slurm/install.sh) and root (slurmd runs jobs as any user).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

NODES = ("n1", "n2")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# slurmd/slurmctld live in /usr/sbin, which a non-login root shell may not have on PATH.
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ClusterError(RuntimeError):
    """The cluster could not start, or a job did not do what was asked; the message carries the logs."""


def which(cmd: str) -> str:
    found = shutil.which(cmd) or shutil.which(cmd, path=os.pathsep.join(SBIN))
    if not found:
        raise ClusterError(f"'{cmd}' not found: install SLURM and MUNGE with `bash tests/slurm/install.sh`")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol show job -o` output (one line of Key=Value pairs) -> dict.

    Values may contain spaces only in the last fields we do not read (e.g. Command args), so a token
    without '=' is glued to the previous value."""
    out: dict[str, str] = {}
    last = None
    for token in line.split():
        if "=" in token:
            key, value = token.split("=", 1)
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + token
    return out


class LocalSlurmCluster:
    """Starts and stops a two-node SLURM cluster whose files all live under `root`."""

    def __init__(self, root: str | Path, *, nodes: tuple[str, ...] = NODES, cpus_per_node: int = 2,
                 cred_expire_s: int = 5) -> None:
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        # Also the wait before a requeued job may start again (SLURM's default is 120 s).
        self.cred_expire_s = cred_expire_s
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------------------------------------
    # Environment for SLURM's client commands (and for jobs: sbatch exports it to them).
    # ---------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", "")
        env["PATH"] = os.pathsep.join([path] + [d for d in SBIN if d not in path.split(os.pathsep)])
        return env

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "pid"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses keys and directories that others can read or write.
        (self.root / "munge").chmod(0o700)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        node_lines = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for name, port in zip(self.nodes, node_ports))
        r = self.root
        text = f"""\
# Written by tests/slurm/cluster.py: a two-node cluster on one machine (see that file).
ClusterName=reidtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/pid/slurmctld.pid
SlurmdPidFile={r}/pid/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
SchedulerParameters=sched_interval=2
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env,
                                             start_new_session=True)
        log.close()

    def start(self, timeout: float = 60.0) -> LocalSlurmCluster:
        """Write the configuration, start the daemons and wait until every node is idle."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([which("mungekey"), "--create", "--keyfile", str(key)], check=True,
                           capture_output=True)
        key.chmod(0o600)
        try:
            self._spawn("munged", [which("munged"), "--foreground", "--force",
                                   f"--key-file={key}", f"--socket={self.munge_socket}",
                                   f"--pid-file={self.root}/pid/munged.pid",
                                   f"--log-file={self.root}/log/munged.log",
                                   f"--seed-file={self.root}/munge/munged.seed"])
            self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged to open its socket")
            # -i: ignore state from an earlier start in the same directory.
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait_for(self._controller_up, timeout, "slurmctld to answer")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_for(self._nodes_idle, timeout, f"nodes {','.join(self.nodes)} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _controller_up(self) -> bool:
        return self._run(["scontrol", "ping"], check=False).stdout.count("UP") > 0

    def _nodes_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.25)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        """Last lines of every daemon log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _our_processes(self) -> list[psutil.Process]:
        """Every process carrying this cluster's SLURM_CONF (daemons, slurmstepd, job steps), except us.

        slurmstepd detaches from slurmd, so the process tree does not find it; its environment does."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == os.getpid():
                continue
            try:
                if proc.environ().get("SLURM_CONF") == str(self.conf):
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel every job, stop the daemons, and end any process left from a job step."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            jobs = self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self._run(["scancel", "--full", *jobs], check=False)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers = self._our_processes()
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=5)
        self._procs.clear()

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------
    # Jobs
    # ---------------------------------------------------------------------------------------------
    def _run(self, argv: list[str], *, check: bool = True, timeout: float = 30.0,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([which(argv[0]), *argv[1:]], env=self.env, cwd=cwd, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"`{' '.join(argv)}` failed ({result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def sbatch(self, args: list[str], *, cwd: str | Path | None = None,
               env: dict[str, str] | None = None) -> int:
        """Submit `sbatch args...` and return the job id. `env` adds variables the job inherits."""
        full_env = self.env | (env or {})
        result = subprocess.run([which("sbatch"), "--parsable", *args], env=full_env, cwd=cwd,
                                text=True, capture_output=True, timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's view of a job (kept for MinJobAge after it ends)."""
        return parse_scontrol(self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout)

    def wait(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll until `until(info)` holds (default: the job reached a terminal state); return the info.

        On time-out the job is cancelled and ClusterError carries its state and the daemon logs."""
        until = until or (lambda info: info.get("JobState") in TERMINAL_STATES)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.5)
        self._run(["scancel", "--full", str(job_id)], check=False)
        raise ClusterError(f"job {job_id} not done after {timeout:.0f} s: state "
                           f"{info.get('JobState')} ({info.get('Reason')})\n{self.logs()}")

    def signal_steps(self, job_id: int, sig: str) -> None:
        """Send `sig` to the job's steps (not the batch shell), as `--signal=SIG@T` does at time T."""
        self._run(["scancel", f"--signal={sig}", str(job_id)])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    cluster = LocalSlurmCluster(argv[0]).start()
    print(f"cluster up; in another shell: export SLURM_CONF={cluster.conf}  (Ctrl-C stops it)")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
