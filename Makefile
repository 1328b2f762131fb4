# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo_out
# `make ablation`: the AlignedReID ablation on the embedded synthetic data at the hardest crop
# misalignment (launch/ablate.py). Every setting is here; override on the command line, e.g.
# make ablation ABLATION_ARGS="--synthetic-misalign 0,0.5,1 --seeds 3 train.epochs=16".
ABLATION_DIR    ?= ablation_out
ABLATION_RECIPE ?= configs/demo.yaml
# About an hour on 2 cores (59 min measured): 3 seeds x (global, aligned), 12 epochs of 100 identities. Mutual
# learning trains two networks: add it with --variants global,aligned,mutual (about twice as long).
ABLATION_ARGS   ?= --synthetic-misalign 1.0 --seeds 3 --variants global,aligned --nproc 2 \
                   --train-ids 100 --test-ids 100 train.epochs=12

.PHONY: venv system-deps demo ablation test test-fast bench lint clean

# Idempotent: re-running only installs what is missing. torch is pinned HERE (a CPU wheel is
# available locally; an unpinned torch pulls a multi-GB CUDA build). DeepSpeed (the `deepspeed`
# extra: engine.backend=deepspeed, which the tests train with) imports torch while building, so it
# goes in after torch without build isolation.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages some tests need (a real local SLURM cluster: slurm-wlm + munge). Idempotent.
system-deps:
	bash tests/slurm/install.sh

demo: venv
	$(PY) launch/demo.py --out $(DEMO_DIR)

# Re-running resumes: finished trainings are skipped, a crashed one continues from its checkpoint.
ablation: venv
	$(PY) launch/ablate.py --config $(ABLATION_RECIPE) --out $(ABLATION_DIR) $(ABLATION_ARGS)

# ruff, configured in pyproject.toml ([tool.ruff]); `make test` runs it first.
lint: venv
	$(PY) -m ruff check .

test: venv system-deps lint
	$(PY) -m pytest -q tests

test-fast: venv lint
	$(PY) -m pytest -q tests -m "not slow and not slurm"

bench: venv
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/local_distance.py
	$(PY) benchmarks/evaluation.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(DEMO_DIR) $(ABLATION_DIR) .pytest_cache
