# shellcheck shell=bash
# Shared by train.sbatch and evaluate.sbatch (sourced, not run): where the project and its Python are,
# and the torchrun rendezvous for this allocation. sbatch runs a copy of the batch script from its spool
# directory, so the scripts find this file through REID_ROOT, not through their own path.
#
# Settings (environment variables; sbatch passes the submitting shell's environment to the job):
#   REID_ROOT       project checkout on the shared filesystem   [the directory sbatch was run from]
#   REID_PYTHON     interpreter with the project installed      [$REID_ROOT/.venv/bin/python, else python3]
#   NPROC_PER_NODE  trainer processes per node (one per GPU)    [$SLURM_GPUS_ON_NODE, else 1]
#   RDZV_HOST       rendezvous host                             [NodeAddr of the first node of the job]
#   RDZV_PORT       rendezvous port on that host                [29500 + job id % 2000]
#   MAX_RESTARTS    torchrun restarts after a worker failure    [0: a failed node fails the step]

reid_setup() {
    REID_ROOT="${REID_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    if [ ! -f "$REID_ROOT/launch/train.py" ]; then
        echo "error: REID_ROOT=$REID_ROOT is not the project checkout (no launch/train.py);" \
             "submit from the checkout or export REID_ROOT=/shared/path/to/checkout" >&2
        exit 2
    fi
    cd "$REID_ROOT" || exit 2
    if [ -z "${REID_PYTHON:-}" ]; then
        if [ -x "$REID_ROOT/.venv/bin/python" ]; then
            REID_PYTHON="$REID_ROOT/.venv/bin/python"
        else
            REID_PYTHON=python3
        fi
    fi
    # find_spec, not import: importing torch here would cost seconds at every (re)start.
    if ! "$REID_PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" \
            2>/dev/null; then
        echo "error: REID_PYTHON=$REID_PYTHON has no torch;" \
             "export REID_PYTHON=/path/to/venv/bin/python (the project's environment)" >&2
        exit 2
    fi

    NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
    # Rendezvous on the job's first node, at the address SLURM itself uses to reach it (NodeAddr:
    # usually the host name; 127.0.0.1 on the one-machine test cluster, whose node names resolve nowhere).
    local head
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    if [ -z "${RDZV_HOST:-}" ]; then
        RDZV_HOST="$(scontrol show node "$head" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
        RDZV_HOST="${RDZV_HOST:-$head}"
    fi
    # Derived from the job id so that two jobs sharing a head node do not collide.
    RDZV_PORT="${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 2000))}"
    MAX_RESTARTS="${MAX_RESTARTS:-0}"
    # Workers create their own store each restart round: with torch's shared rendezvous store a
    # restarted round can read the previous round's addresses (see docs/multinode.md).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    echo "[$(date '+%F %T')] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s)" \
         "x $NPROC_PER_NODE process(es), rendezvous $RDZV_HOST:$RDZV_PORT (head $head), python $REID_PYTHON"
}

# Run one torchrun agent per node (`srun` with one task per node) around the given script and
# arguments, in the background; sets STEP_PID. `python -m torch.distributed.run` is `torchrun`, taken
# from REID_PYTHON's environment. SIGUSR1 (sbatch --signal=USR1@T) reaches the agents, and torchrun
# forwards it to the trainers only when it is listed in --signals-to-handle.
reid_launch() {
    srun --ntasks-per-node=1 --kill-on-bad-exit=0 \
        "$REID_PYTHON" -m torch.distributed.run \
        --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE" \
        --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \
        --max-restarts "$MAX_RESTARTS" \
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
        "$@" &
    STEP_PID=$!
}

# Wait for the step started by reid_launch; sets STEP_STATUS. A SIGTERM to the batch shell (scancel,
# preemption) must not end it before the trainers have checkpointed: SLURM signals the step itself,
# and the shell keeps waiting for it.
# shellcheck disable=SC2034  # STEP_STATUS is read by the batch script that sourced this file.
reid_wait() {
    trap 'echo "[$(date "+%F %T")] batch shell got SIGTERM; waiting for the trainers to checkpoint"' TERM
    STEP_STATUS=0
    while :; do
        wait "$STEP_PID" && STEP_STATUS=0 || STEP_STATUS=$?
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    trap - TERM
}
