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
              "mlflow.models.signature", "mlflow.types.schema", "mlflow.artifacts",
              # the dataset API (documented: mlflow.data), for the runs' dataset inputs
              "mlflow.data.dataset", "mlflow.data.dataset_source", "mlflow.data.http_dataset_source")
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(name, n) for n in names if n.startswith("mlflow") and n not in public]
    assert not found, found


# --------------------------------------------------------------------------------------------------
# The import graph: no circles, and every import goes down the layer order
# --------------------------------------------------------------------------------------------------
# Bottom to top; docs/architecture.md states the same order. A unit is pipeline's top-level module or
# package; imports inside one unit are free (the cycle check still covers them), an import from one
# unit into another must go to a strictly lower layer. The root package (empty) sits below everything.
LAYERS = (
    ("fileio", "typed_yaml", "distributed", "alignment", "recipes"),    # leaves
    ("config", "logs"),
    ("data",),
    ("checkpoint",),            # the file format
    ("model",),                 # networks, weights, rebuilding a network from a checkpoint
    ("losses",),
    ("evaluation", "inference"),
    ("serving",),               # the logged model; wraps inference
    ("tracking",),              # calls serving
    ("engine", "ablation"),
    ("cli",),
)
UNIT_ALIASES = {"serving_model": "serving"}      # the MLflow entry point file of the serving unit
LAYER_OF = {"": -1, **{unit: i for i, units in enumerate(LAYERS) for unit in units}}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.AST) -> bool:
    return _dotted(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imported_names(tree: ast.AST):
    """(node, module level or not) for every Import / ImportFrom, at any depth (functions, methods,
    try blocks), leaving out the bodies of `if TYPE_CHECKING:` (their `else:` counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for the package at `root` (a folder with
    __init__.py), from its source: module-level and function-level imports; relative imports
    resolved; `from pkg import name` counts as importing pkg, and pkg.name too when that is a module
    (but `from . import submodule` inside pkg only imports the submodule: pkg is already importing);
    importing a.b.c also imports the packages a.b and a (their __init__ runs first), except those the
    importer is itself inside (already importing). A package's __init__ is a module like any other,
    so its re-exports are edges."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in _imported_names(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = [f"{module}.{alias.name}" for alias in node.names]
                # `from . import sub` inside the package only needs the package object, which is
                # already being imported; any other name is read from the package's __init__.
                inside = module == name or module in _ancestors(name)
                targets = subs if inside and all(s in files for s in subs) else [module] + subs
            for target in targets:
                if target not in files:
                    continue            # another distribution, or a name that is not a module
                found.add(target)
                found.update(a for a in _ancestors(target) if a not in _ancestors(name) and a != name)
        found.discard(name)
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def unit_of(module: str) -> str:
    """pipeline.tracking.store -> tracking; the root package -> ''."""
    top = module.split(".")[1] if "." in module else ""
    return UNIT_ALIASES.get(top, top)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that do not go down the layer order (unknown units are reported too)."""
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = unit_of(source), unit_of(target)
            if a == b:
                continue
            if a not in LAYER_OF or b not in LAYER_OF:
                bad.append(f"{source} -> {target}: {a if a not in LAYER_OF else b!r} has no layer in LAYERS")
            elif LAYER_OF[b] >= LAYER_OF[a]:
                bad.append(f"{source} (layer {LAYER_OF[a]}, {a}) -> {target} (layer {LAYER_OF[b]}, {b})")
    return bad


def test_the_package_has_no_import_circles():
    graph = import_graph(PACKAGE)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_import_goes_down_the_layer_order():
    bad = upward_imports(import_graph(PACKAGE))
    assert not bad, "imports against the layer order (docs/architecture.md):\n  " + "\n  ".join(bad)


def test_every_unit_has_a_layer_and_the_docs_state_the_order():
    units = {unit_of(m) for m in import_graph(PACKAGE)}
    assert units <= set(LAYER_OF), f"units without a layer: {sorted(units - set(LAYER_OF))}"
    docs = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    stated = " → ".join(", ".join(layer) for layer in LAYERS)
    assert stated in docs, f"docs/architecture.md must state the layer order: {stated}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pipeline"


def test_the_graph_sees_the_circles_the_old_code_had(tmp_path):
    """The shapes of the two circles this test was written against (issue #19), in a synthetic package:
    a package re-export plus a function-level import back (checkpoint <-> model), and a circle through
    a package __init__ and function-level imports (inference -> serving -> tracking -> serving)."""
    root = _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/config.py": "",
        "pipeline/checkpoint.py": ("from typing import TYPE_CHECKING\nfrom .config import x\n"
                                   "if TYPE_CHECKING:\n    from .inference import y\n"
                                   "def rebuild():\n    from .model import build_model\n"),
        "pipeline/model/__init__.py": "from ..checkpoint import rebuild\nfrom .aligned import build_model\n",
        "pipeline/model/aligned.py": "from ..config import x\n",
        "pipeline/inference.py": "def load():\n    from pipeline.serving import network_from_uri\n",
        "pipeline/serving.py": ("def network_from_uri():\n    from pipeline.tracking import resolve\n"
                                "class M:\n    def load(self):\n        from pipeline.inference import E\n"),
        "pipeline/tracking/__init__.py": "from .names import resolve\nfrom .tracker import Tracker\n",
        "pipeline/tracking/names.py": "import os\n",
        "pipeline/tracking/tracker.py": "def log_model():\n    from pipeline.serving import save\n",
    })
    graph = import_graph(root)
    assert graph["pipeline.checkpoint"] == {"pipeline.config", "pipeline.model"}      # TYPE_CHECKING left out
    assert graph["pipeline.model"] == {"pipeline.checkpoint", "pipeline.model.aligned"}
    assert graph["pipeline.model.aligned"] == {"pipeline.config"}
    assert graph["pipeline.serving"] == {"pipeline.tracking", "pipeline.inference"}
    assert graph["pipeline.tracking"] == {"pipeline.tracking.names", "pipeline.tracking.tracker"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert cycle == ["pipeline.checkpoint", "pipeline.model", "pipeline.checkpoint"]
    graph["pipeline.checkpoint"].discard("pipeline.model")
    graph["pipeline.model"].discard("pipeline.checkpoint")
    assert find_cycle(graph) == ["pipeline.inference", "pipeline.serving", "pipeline.inference"]
    graph["pipeline.serving"].discard("pipeline.inference")
    assert find_cycle(graph) == ["pipeline.serving", "pipeline.tracking", "pipeline.tracking.tracker",
                                 "pipeline.serving"]
    assert "pipeline.checkpoint (layer 3, checkpoint) -> pipeline.model (layer 4, model)" in \
        upward_imports(import_graph(root))
    assert any(line.startswith("pipeline.serving (layer 7") and "pipeline.tracking" in line
               for line in upward_imports(import_graph(root)))


def test_imports_of_submodules_count_their_packages(tmp_path):
    """`import a.b.c` and `from .b import c` run the packages' __init__ first: edges to them too, but
    not to the packages the importer is inside; `from pkg import name` reaches pkg.name when a module."""
    root = _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/data/__init__.py": "from .shards import load\n",
        "pipeline/data/shards.py": "from . import images\nfrom .images import decode\n",
        "pipeline/data/images.py": "",
        "pipeline/evaluation/__init__.py": "",
        "pipeline/evaluation/features.py": "import pipeline.data.images\nfrom pipeline.evaluation import x\n",
    })
    graph = import_graph(root)
    assert graph["pipeline.data.shards"] == {"pipeline.data.images"}
    assert graph["pipeline.evaluation.features"] == {"pipeline.data", "pipeline.data.images", "pipeline.evaluation"}
    assert find_cycle(graph) is None
