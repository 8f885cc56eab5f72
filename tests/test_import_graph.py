"""Imports run one way: the module graph of backbone/, network_files/, train_utils/ and tools/,
read with ``ast`` (module-level and function-level imports alike), has no cycle; train_utils'
packages import only from layers below them; backbone/ takes only ``network_files.ops`` from the
detector's folder."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backbone", "network_files", "train_utils", "tools")

# train_utils' units (a subpackage or a top-level module), lowest first. A unit may import from its
# own unit and from lower layers only; units of one layer do not import each other.
TRAIN_UTILS_LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"flags", "device", "progress", "distributed", "jsonl"}),  # need only torch and the stdlib
    frozenset({"data"}),
    frozenset({"model"}),
    frozenset({"checkpoint", "cli"}),
    frozenset({"loading"}),  # a detector rebuilt from a weights file, for evaluation and inference
    frozenset({"evaluation"}),
    frozenset({"vis"}),
    frozenset({"engine", "inference"}),
)

Graph = Mapping[str, Iterable[str]]


def module_files(root: Path = ROOT, packages: Sequence[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` (a package is its __init__)."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = file
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Every dotted name an import statement anywhere in ``tree`` asks for; ``from a import b``
    gives ``a.b``, which is a module or else a name inside module ``a``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports (the longest known prefix of each name)."""
    graph = {}
    for module, file in modules.items():
        targets = set()
        for name in _imported_names(ast.parse(file.read_text(), str(file)), module, file.name == "__init__.py"):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: Graph) -> list[str]:
    """One import cycle of ``graph`` as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def _unit(module: str) -> str:
    """train_utils.data.voc -> data; train_utils.flags -> flags."""
    return module.split(".")[1] if module.count(".") else ""


def layer_violations(graph: Graph, layers: Sequence[frozenset[str]]) -> list[str]:
    """One line per import of a train_utils module from a unit not below it (or a unit that no
    layer names)."""
    level = {unit: number for number, layer in enumerate(layers) for unit in layer}
    problems = []
    for module, targets in sorted(graph.items()):
        if not module.startswith("train_utils."):
            continue
        for target in sorted(targets):
            if not target.startswith("train_utils.") or _unit(target) == _unit(module):
                continue
            source_unit, target_unit = _unit(module), _unit(target)
            unplaced = [unit for unit in (source_unit, target_unit) if unit not in level]
            if unplaced:
                problems.append(f"{module} -> {target}: {unplaced[0]} is in no layer")
            elif level[target_unit] >= level[source_unit]:
                problems.append(f"{module} -> {target}: {target_unit} is not below {source_unit}")
    return problems


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def foreign_imports(graph: Graph, source: str, allowed: Mapping[str, Sequence[str]]) -> list[str]:
    """Imports by the modules of ``source`` (a package or subpackage) from the packages named in
    ``allowed`` that fall outside the allowed prefixes (``allowed[package]``; [] allows none)."""
    problems = []
    for module, targets in sorted(graph.items()):
        if not _within(module, source):
            continue
        for target in sorted(targets):
            package = target.split(".")[0]
            if package in allowed and not any(_within(target, prefix) for prefix in allowed[package]):
                problems.append(f"{module} -> {target}")
    return problems


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_the_graph_is_read_from_every_kind_of_import(graph):
    """Module-level, function-level and relative imports all count."""
    assert "network_files.ops.fast_path" in graph["backbone.conv_bn"]  # from network_files.ops import fast_path
    assert "network_files.ops.boxes" in graph["network_files.roi_head"]  # from .ops import boxes as box_ops
    assert "network_files.ops.tracing" in graph["network_files.ops.roi_align"]  # from .tracing import is_tracing
    assert "train_utils.vis.report" in graph["tools.benchmark"]  # inside a function
    assert len(graph) > 80


def test_no_import_cycle(graph):
    assert find_cycle(graph) == []


def test_train_utils_imports_only_downward(graph):
    units = {_unit(module) for module in graph if module.startswith("train_utils.")}
    assert units == set().union(*TRAIN_UTILS_LAYERS)  # every unit has its place
    assert layer_violations(graph, TRAIN_UTILS_LAYERS) == []


def test_backbone_and_the_network_stay_below_train_utils(graph):
    assert foreign_imports(graph, "backbone", {"network_files": ["network_files.ops"], "train_utils": [],
                                               "tools": []}) == []
    assert foreign_imports(graph, "network_files", {"backbone": [], "train_utils": [], "tools": []}) == []
    assert foreign_imports(graph, "network_files.ops", {"network_files": ["network_files.ops"]}) == []
    assert foreign_imports(graph, "train_utils", {"tools": []}) == []


# ---------------------------------------------------------------------------- the checker on hand-made graphs
def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": set(), "c": {"d"}, "d": {"c"}}) == ["c", "d", "c"]


def test_layer_violations_on_a_small_graph():
    layers = (frozenset({"low"}), frozenset({"data"}), frozenset({"engine", "inference"}))
    good = {"train_utils.engine.loop": {"train_utils.data.x", "train_utils.low", "train_utils.engine.y", "torch"},
            "train_utils.data.x": {"train_utils.low"}}
    assert layer_violations(good, layers) == []
    bad = {"train_utils.data.x": {"train_utils.engine.loop"},  # upward
           "train_utils.engine.loop": {"train_utils.inference.z"},  # sideways within a layer
           "train_utils.low": {"train_utils.vis.draw"}}  # a unit in no layer
    assert layer_violations(bad, layers) == [
        "train_utils.data.x -> train_utils.engine.loop: engine is not below data",
        "train_utils.engine.loop -> train_utils.inference.z: inference is not below engine",
        "train_utils.low -> train_utils.vis.draw: vis is in no layer",
    ]


def test_foreign_imports_on_a_small_graph():
    graph = {"backbone.fpn": {"network_files.ops.fast_path", "network_files.poolers", "backbone.registry"},
             "backbone.vgg": {"train_utils.cli"}}
    allowed = {"network_files": ["network_files.ops"], "train_utils": []}
    assert foreign_imports(graph, "backbone", allowed) == ["backbone.fpn -> network_files.poolers",
                                                           "backbone.vgg -> train_utils.cli"]


def test_import_graph_reads_relative_and_late_imports(tmp_path):
    """A synthetic tree: relative imports resolve against the package, an import inside a function
    counts, and the cycle it closes is found."""
    (tmp_path / "train_utils" / "data").mkdir(parents=True)
    (tmp_path / "train_utils" / "__init__.py").write_text("")
    (tmp_path / "train_utils" / "data" / "__init__.py").write_text("from . import voc\n")
    (tmp_path / "train_utils" / "data" / "voc.py").write_text("from .dataset import X\n")
    (tmp_path / "train_utils" / "data" / "dataset.py").write_text(
        "def f():\n    from train_utils.data import voc\n")
    graph = import_graph(module_files(tmp_path, ["train_utils"]))
    assert graph["train_utils.data"] == {"train_utils.data.voc"}
    assert graph["train_utils.data.voc"] == {"train_utils.data.dataset"}
    assert graph["train_utils.data.dataset"] == {"train_utils.data.voc"}
    assert find_cycle(graph) == ["train_utils.data.voc", "train_utils.data.dataset", "train_utils.data.voc"]

