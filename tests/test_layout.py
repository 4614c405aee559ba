"""The package's layering: imports only point down, and no module imports itself through others.

Layers, lowest first (a module may import its own layer and the ones below):
base helpers; data (knows no model); the method (models); inference; training (its sample callback
draws with the pipeline); evaluation; SynthWorld; tooling that builds assets and benchmarks.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moa"
LAYERS = [
    ("moa.seeding", "moa.pretrained", "moa.config", "moa.checks", "moa.files"),
    ("moa.data",),
    ("moa.models",),
    ("moa.inference",),
    ("moa.training",),
    ("moa.evaluation",),
    ("moa.synthworld",),
    ("moa.tiny", "moa.embedded", "moa.bench", "moa.demo"),
]
# Re-exports kept for the public API (``from moa import MoAPipeline``, ``moa.pipeline.Subject``).
REEXPORTS = {"moa", "moa.pipeline"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py: place it")


def imports_of(path: Path) -> set[str]:
    """Every ``moa.*`` module ``path`` imports, function-local imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moa"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("moa"))
    return found


def package_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if module_name(p) not in REEXPORTS}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
            for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*trail, module, target]
            if target in graph and target not in state:
                cycle = visit(target, [*trail, module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def test_imports_only_point_down():
    upward = upward_imports(package_graph())
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_the_old_layout_had():
    """The old layout: data imported the model, and ffhq and shards imported each other."""
    old = {"moa.data.ffhq": {"moa.models.model", "moa.data.shards"}, "moa.data.shards": {"moa.data.ffhq"},
           "moa.models.model": set()}
    assert upward_imports(old) == ["moa.data.ffhq (layer 1) imports moa.models.model (layer 2)"]
    assert find_cycle(old) == ["moa.data.ffhq", "moa.data.shards", "moa.data.ffhq"]


def test_data_workers_do_not_import_the_model():
    """A DataLoader worker imports the data modules only: no diffusers, no MoA layers."""
    import subprocess
    import sys

    code = ("import sys, moa.data.datamodule, moa.data.ffhq, moa.data.shards; "
            "bad = [m for m in sys.modules if m.startswith(('diffusers', 'moa.models'))]; print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
