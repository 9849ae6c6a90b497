"""The package's import graph, computed from the source with `ast`: imports only go down the stages
(ARCHITECTURE.md's table, in this order), there is no cycle, and every harness import inside a
function says why (on its line, its group's, or the line above the group).

Every import counts, wherever it stands (module top, function, `if TYPE_CHECKING:`): a dependency a
reader cannot see is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harness"

#: bottom first; a module may import its own stage and the stages before it, never one after it
STAGES = [
    ("ground", ("harness.errors", "harness.io", "harness.paper", "harness.hardware")),
    ("config", ("harness.config",)),
    ("study", ("harness.study",)),
    ("models", ("harness.models",)),
    ("data", ("harness.data",)),
    ("metrics", ("harness.metrics",)),
    ("sampling", ("harness.sampling",)),
    ("interop", ("harness.interop",)),
    ("training", ("harness.training",)),
    ("cost", ("harness.cost",)),
    ("report", ("harness.report",)),
    ("launch", ("harness.launch",)),
    ("cli", ("harness.cli", "harness.__main__", "harness")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The harness module a dotted name lives in (`harness.models.dit.DiT` -> `harness.models.dit`)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """[(imported harness module, line, inside a function)] of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name.split(".")[0] == "harness":
                    target = _resolve(name)
                    if target != module:
                        found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _stage(module: str) -> int:
    best = max((prefix for _, prefixes in STAGES for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, (_, prefixes) in enumerate(STAGES) if best in prefixes)


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_belongs_to_a_declared_stage():
    assert all(_stage(m) is not None for m in MODULES)


def test_imports_only_go_down_the_stages():
    upward = [f"{m}:{line} imports {t} ({STAGES[_stage(t)][0]} is above {STAGES[_stage(m)][0]})"
              for m, edges in GRAPH.items() for t, line, _ in edges if _stage(t) > _stage(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}   # 1 on the current path, 2 done
    cycles = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t, _, _ in GRAPH[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [m, t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                walk(t, path + [m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            walk(m, [])
    assert not cycles, "\n".join(cycles)


def test_each_function_level_import_says_why():
    unexplained = []
    for m, edges in GRAPH.items():
        lines = MODULES[m].read_text().splitlines()
        for _, line, in_function in edges:
            first = line   # a group of imports shares one reason: on any of its lines, or the line above it
            while lines[first - 2].strip().startswith(("from harness", "import harness")):
                first -= 1
            group, above = lines[first - 1:line], lines[first - 2].strip()
            here = lines[line - 1]
            if in_function and not any("#" in g for g in group) and not above.startswith("#"):
                unexplained.append(f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {here.strip()}")
    assert not unexplained, "function-level imports without a reason:\n" + "\n".join(unexplained)


def test_the_torch_free_layers_import_without_torch():
    """config, study, cost (but `harness bench`) and launch, and the entry modules of metrics, evaluation and
    report: `harness --help`, `plan`, `status` and the spec's validation start without loading torch."""
    import subprocess
    import sys

    torch_free = sorted(m for m in MODULES if m.startswith(("harness.config", "harness.study", "harness.cost", "harness.launch"))
                        and m != "harness.cost.bench"   # `harness bench` times torch on the device
                        or m in ("harness.cli", "harness.errors", "harness.io", "harness.metrics",
                                 "harness.training.evaluation", "harness.report", "harness.data.latents"))
    code = f"import sys\nfor m in {torch_free!r}:\n    __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "False"
