"""The command-line entry points, each `main(argv=None) -> int` (the exit status) in its own module:

    reid-train     pipeline.cli.train      train (one process, or under torchrun: `torchrun -m pipeline.cli.train`)
    reid-evaluate  pipeline.cli.evaluate   evaluate a checkpoint
    reid-prepare   pipeline.cli.prepare    pack a dataset into shards
    reid-synth     pipeline.cli.synth      draw the synthetic dataset
    reid-compare   pipeline.cli.compare    compare the MLflow runs of an experiment
    reid-export    pipeline.cli.export     export the network to ONNX
    reid-demo      pipeline.cli.demo       the whole pipeline on synthetic data

`launch/*.py` are the same commands for a source checkout (`python launch/train.py`). An entry point
parses its arguments, configures logging (pipeline.logs) and calls into the package; nothing more.
`--config` takes a YAML path or the name of a shipped recipe (pipeline/recipes: demo, market1501, ...).
"""
