"""The house rules that keep one place per concern (docs/architecture.md), checked on the source."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _dotted(node: ast.AST) -> str:
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def test_only_distributed_py_imports_torch_distributed():
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                found.append(name)
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                    a.name == "distributed" for a in node.names):
                found.append(name)
    assert set(found) == {"pipeline/distributed.py"}, found


def test_only_checkpoint_py_calls_torch_load():
    found = {name for name, tree in _modules() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load"}
    assert found == {"pipeline/checkpoint.py"}, found


def test_no_private_mlflow_modules():
    public = ("mlflow", "mlflow.entities", "mlflow.exceptions", "mlflow.pyfunc", "mlflow.models",
              "mlflow.models.signature", "mlflow.types.schema", "mlflow.artifacts")
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(name, n) for n in names if n.startswith("mlflow") and n not in public]
    assert not found, found
