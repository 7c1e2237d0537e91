"""The package's import graph: no cycles, layers that run one way (docs/ARCHITECTURE.md, "Layers").

Every ``import`` counts, function-level ones included (a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` do not (they never run). Entering a package from outside also runs its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffcache

ROOT = Path(diffcache.__file__).parent

# Lowest first. A module may import its own layer and those below it; the two arrows that run back up are
# named in UPWARD with the reason docs/ARCHITECTURE.md gives.
LAYERS = [
    ("base", ["errors", "optional", "registry", "files", "data", "loading", "memory"]),
    ("plan", ["schedule"]),
    ("families", ["adapters"]),
    ("kernels", ["kernels"]),
    ("runtime", ["runtime"]),
    ("presets", ["schedules.presets"]),
    ("quant", ["quant"]),
    ("measure", ["eval.cost", "eval.metrics", "eval.plots", "eval.baselines", "eval.quality", "eval.intervals"]),
    ("models", ["models", "testing"]),
    ("search", ["schedules"]),
    ("api", ["api", "__init__"]),
    ("face", ["cli", "__main__", "eval"]),
]
UPWARD = {
    ("loading", "models"),  # load_pipeline resolves the embedded defaults' names ("digits-dit")
}
NEVER = [  # (importer layer, imported layer): the whiteboard's "never" imports
    ("plan", "presets"), ("plan", "families"), ("plan", "runtime"), ("runtime", "search"), ("runtime", "measure"),
    ("api", "face"), ("search", "face"), ("search", "models"), ("quant", "search"), ("measure", "search"),
    ("kernels", "quant"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").exists() if name != "__init__" else False


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package and package != "__init__" else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}".strip(".") in modules else stem
                           for a in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                targets = [n[len("diffcache."):] for n in names if n.startswith("diffcache.")]
                targets += ["__init__" for n in names if n == "diffcache"]
            for target in targets:
                target = target.strip(".") or "__init__"
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target not in modules or target == name:
                    continue
                edges[name].add(target)
                # Entering a package from outside runs its __init__ (and each parent's).
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not name.startswith(parent + ".") and parent != name:
                        edges[name].add(parent)
    return edges


# A package's own __init__, where its layer differs from its submodules' (by prefix).
PACKAGES = {"eval": "measure", "schedules": "base"}


def layer_of(module: str) -> str:
    if module in PACKAGES:
        return PACKAGES[module]
    best, depth = None, -1
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = layer, prefix.count(".")
    assert best is not None, f"{module} is on no layer; add it to LAYERS and docs/ARCHITECTURE.md"
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_layers_run_one_way():
    order = {layer: i for i, (layer, _) in enumerate(LAYERS)}
    up = sorted((a, b) for a, targets in graph().items() for b in targets
                if order[layer_of(b)] > order[layer_of(a)])
    assert set(up) <= UPWARD, f"imports from a lower layer to a higher one: {sorted(set(up) - UPWARD)}"
    assert len(UPWARD) <= 2


def test_never_imports():
    never = set(NEVER)
    broken = sorted((a, b) for a, targets in graph().items() for b in targets
                    if (layer_of(a), layer_of(b)) in never)
    assert broken == []


def test_the_checks_can_fail():
    edges = graph()
    edges["schedule"] = edges["schedule"] | {"schedules.presets"}
    edges["schedules.presets"] = edges["schedules.presets"] | {"schedule"}
    assert cycles(edges)
    assert ("plan", "presets") in NEVER and layer_of("schedules.presets") == "presets"
