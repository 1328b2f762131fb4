#!/usr/bin/env bash
# Installs Debian's SLURM (controller, node daemon, client) and MUNGE for the local two-node test
# cluster (tests/slurm/cluster.py). Idempotent: does nothing when everything is already there, so
# `make test` can run it every time; only then does it touch apt (update first: a fresh image has no
# package lists). Needs root and a Debian/Ubuntu machine that reaches its package mirror.
set -euo pipefail

# Commands the test harness calls; a package is missing when any of its commands is.
required=(slurmctld slurmd sbatch squeue scontrol sacct scancel srun munged mungekey)

missing=()
for cmd in "${required[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
        || missing+=("$cmd")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install.sh: SLURM and MUNGE already installed"
    exit 0
fi
echo "install.sh: missing ${missing[*]}; installing slurm-wlm and munge"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root to apt-get install slurm-wlm munge" \
         "(run: sudo bash tests/slurm/install.sh)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get not found; install SLURM (slurmctld, slurmd, client tools) and MUNGE" \
         "with this system's package manager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# No recommends: they pull in MySQL/accounting and X11 pieces the local test cluster does not use.
apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "install.sh: installed $(slurmctld -V 2>/dev/null || /usr/sbin/slurmctld -V)"
