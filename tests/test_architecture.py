"""The layer rules of ARCHITECTURE.md, checked on the source: each layer imports only the layers beneath it,
inference never imports training, preprocessing never imports lungs, and no modules import each other in a
circle. Lazy imports inside functions count; imports only for type checking do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lungscreen"
#: Bottom to top; a package may import its own layer and the layers listed before it.
LAYERS = [
    {"errors", "interrupts", "io", "progress"},
    {"evaluation"},  # the metrics module: pure functions
    {"data"},
    {"models"},
    {"preprocessing"},
    {"lungs"},
    {"inference"},  # scoring images with a checkpoint: beneath training, whose test step scores with it
    {"training"},
    {"audit", "serve", "pacs"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST, *, type_checking: bool = False) -> list[str]:
    """Every ``lungscreen...`` module named by an import, skipping ``if TYPE_CHECKING:`` blocks unless
    ``type_checking``."""
    found = []

    def visit(node: ast.AST) -> None:
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)  # a module, or a name in one
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name.startswith("lungscreen")]


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the lungscreen modules it imports (those imported for type checking only too, if asked)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    return {name: {resolve(target) for target in runtime_imports(ast.parse(path.read_text()),
                                                                 type_checking=type_checking)} - {name}
            for name, path in modules.items()}  # resolve: "pkg.mod.Name" -> "pkg.mod", "pkg.Name" -> "pkg"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return next((index for index, layer in enumerate(LAYERS) if top in layer), None)


def test_every_package_sits_in_a_layer(graph):
    unplaced = sorted({m.split(".")[1] for m in graph if "." in m and layer_of(m) is None} - {"__main__"})
    assert not unplaced, f"add {unplaced} to LAYERS (and to ARCHITECTURE.md's picture)"


def test_no_layer_imports_a_layer_above_it(graph):
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if layer_of(module) is not None and layer_of(target) is not None and layer_of(target) > layer_of(module)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def test_inference_never_imports_training_and_preprocessing_never_imports_lungs(graph):
    for low, high in (("inference", "training"), ("preprocessing", "lungs")):
        wrong = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith(f"lungscreen.{low}")
                 for t in targets if t.startswith(f"lungscreen.{high}")]
        assert not wrong, wrong


def test_no_import_cycle():
    """Two modules importing each other, even only for type hints, are one concept cut in the wrong place."""
    graph = import_graph(type_checking=True)
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongly_connected(node: str) -> None:  # Tarjan
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in order:
                strongly_connected(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in order:
            strongly_connected(node)
    assert not cycles, f"modules importing each other in a circle: {cycles}"
