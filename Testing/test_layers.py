"""The layers of DESIGN.md ("The shape of it"): every import points down or sideways within its layer, never up,
and no modules import each other in a circle. Imports are read from the source with `ast`, those inside
functions included (an import made late to dodge a cycle is still the cycle), so nothing is imported here.
"""
import ast
from pathlib import Path

import pytest

PRODUCT = Path(__file__).resolve().parents[1] / "SegmentMBTFE"

# DESIGN.md, "The shape of it": "The layers, top to bottom (an import only ever points down): Slicer module shell
# -> SegmentMBTFESlicer (panels, jobs, worker process) -> engine front ends (cli, worker, tasks) -> batch, training
# -> inference -> io -> models -> networks -> shared types (volume, errors, progress)."
# Each module's layer is found by the longest prefix listed here; a module no prefix covers fails the test, so a
# new top-level module of the engine is given its layer on purpose. exchange.py (what crosses between the module
# and the worker) is the front ends'; the package itself and the leaf helpers every layer uses (tensors.py,
# requirements.py, free_memory.py, nnunet_trainers.py: plain data on nnU-Net's trainers, read by models/ and
# networks/) are shared, beside volume, errors and progress.
LAYERS = [
    ["SegmentMBTFE"],
    ["SegmentMBTFESlicer"],
    ["SegmentMBTFELib.cli", "SegmentMBTFELib.cli_models", "SegmentMBTFELib.__main__", "SegmentMBTFELib.worker",
     "SegmentMBTFELib.tasks", "SegmentMBTFELib.exchange"],
    ["SegmentMBTFELib.batch", "SegmentMBTFELib.training"],
    ["SegmentMBTFELib.inference"],
    ["SegmentMBTFELib.io"],
    ["SegmentMBTFELib.models"],
    ["SegmentMBTFELib.networks"],
    ["SegmentMBTFELib", "SegmentMBTFELib.volume", "SegmentMBTFELib.errors", "SegmentMBTFELib.progress",
     "SegmentMBTFELib.tensors", "SegmentMBTFELib.requirements", "SegmentMBTFELib.free_memory",
     "SegmentMBTFELib.nnunet_trainers"],
]
# The package itself is a layer of its own name only: as a prefix it would cover every module of the engine.
WHOLE_PACKAGES = {"SegmentMBTFELib"}


def product_modules() -> dict:
    """{dotted module name: file} for every Python file of the product (the module, its two packages)."""
    modules = {}
    for path in sorted(PRODUCT.rglob("*.py")):
        parts = list(path.relative_to(PRODUCT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict) -> list:
    """(imported product module, line) for every import statement in the file, at any depth."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            # `from . import zips` imports the module zips; `from .folder import Labels` the module folder
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.append((target, node.lineno))
    return found


def layer_of(name: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or (name.startswith(prefix + ".") and prefix not in WHOLE_PACKAGES)]
    if not matches:
        raise AssertionError(f"{name} is in no layer of test_layers.LAYERS: give it its place in DESIGN.md's order")
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph():
    modules = product_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_imports_point_down(graph):
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)}), line {line}"
              for name, imports in graph.items() for target, line in imports if layer_of(target) < layer_of(name)]
    assert not upward, "imports against DESIGN.md's layer order:\n" + "\n".join(upward)


def test_no_import_cycles(graph):
    cycles = strongly_connected(graph)
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components with more than one module (iterative: no recursion limit)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted({t for t, _ in graph[root]})))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({t for t, _ in graph[child]}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_checks_see_what_they_should():
    """The reading itself: relative imports at any depth, `from . import module`, and a cycle and an upward
    import in a made-up graph are found."""
    modules = product_modules()
    name = "SegmentMBTFELib.models.home"
    targets = {t for t, _ in imports_of(name, modules[name], modules)}
    assert {"SegmentMBTFELib.models.zips", "SegmentMBTFELib.models.folder", "SegmentMBTFELib.errors"} <= targets
    name = "SegmentMBTFELib.tasks"   # its imports are all inside functions
    assert "SegmentMBTFELib.models.versions" in {t for t, _ in imports_of(name, modules[name], modules)}
    made_up = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert strongly_connected(made_up) == [["a", "b", "c"]]
    assert layer_of("SegmentMBTFELib.io.images") > layer_of("SegmentMBTFELib.inference.model")
    assert layer_of("SegmentMBTFELib.models.folder") < layer_of("SegmentMBTFELib.errors")
