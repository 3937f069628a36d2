"""The package's imports run one way, from the ground up, with no cycle between files or folders.

Every import statement counts, wherever it stands (in a function, under `if TYPE_CHECKING:`): a lazy import still
ties two modules together. A module may import its own layer or a lower one; within a layer, files and folders
must not import each other in a circle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinychat"

# lowest first; each entry: a module or a folder (all of its modules)
LAYERS = [
    ("errors", ["tinychat.errors", "tinychat.files"]),
    ("ops", ["tinychat._C", "tinychat.ops", "tinychat.int4_layout"]),
    ("model", ["tinychat.config", "tinychat.model", "tinychat.linear"]),
    ("quantization", ["tinychat.quant"]),
    ("io", ["tinychat.io", "tinychat.tokenizer"]),
    ("pipeline", ["tinychat.engine", "tinychat.pipeline", "tinychat.ppl"]),
    ("interfaces", ["tinychat.api", "tinychat.chat", "tinychat.server", "tinychat.bench"]),
    ("cli", ["tinychat.cli", "tinychat.__main__", "tinychat"]),  # tinychat/__init__.py re-exports the API
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific entry that holds `module`."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it there")
    return best[1]


def imports_of(module: str) -> set[str]:
    """The tinychat modules that `module` imports (`from a.b import c` is a.b.c when that is a module, else a.b)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m == "tinychat" or m.startswith("tinychat.")} - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def unit(module: str) -> str:
    """The file or folder a module belongs to, one level below tinychat (tinychat.io.gguf -> tinychat.io)."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_imports_run_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
              for m, deps in GRAPH.items() for dep in sorted(deps)
              if m != "tinychat" and dep != "tinychat" and layer_of(dep) > layer_of(m)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_cycle_between_files():
    graph = {m: {d for d in deps if d != "tinychat"} for m, deps in GRAPH.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_cycle_between_folders():
    graph: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        graph.setdefault(unit(m), set()).update(unit(d) for d in deps if d != "tinychat" and unit(d) != unit(m))
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("graph,cycle", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
                                         ({"a": {"b"}, "b": set(), "c": {"a"}}, None)])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle
