"""The MLflow "models from code" entry point of a logged AlignedReID model. Not meant to be imported.

`pipeline.serving.save_pyfunc_model` passes this file as `python_model`, so MLflow copies it into the
saved model and runs it (with the model's `code/` directory, this package, on sys.path) to get the
PythonModel. Nothing is pickled: the network comes from the weights-only file in load_context.
"""
import mlflow.models

from pipeline.serving import ReIDEmbeddingModel

mlflow.models.set_model(ReIDEmbeddingModel())
