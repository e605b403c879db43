"""The house rules, checked on the source: one-way imports between the project's modules, no cycle,
the library (`synctalk/`) free of config, FastAPI and entry scripts, and no `sys.path` patching."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("synctalk", "services", "data_utils")
ENTRY_SCRIPTS = {"api", "config", "train_328", "inference_328", "evaluate"}  # the library never imports these
NETWORKS = {"unet_328", "syncnet_328", "utils"}
FORBIDDEN_IN_LIBRARY = ENTRY_SCRIPTS | {"fastapi", "starlette", "uvicorn", "services", "data_utils"}


def project_modules() -> dict[str, Path]:
    """Importable module name -> file, for the top-level scripts and the packages."""
    mods = {p.stem: p for p in REPO.glob("*.py")}
    for folder in SOURCE_DIRS:
        for p in (REPO / folder).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import statement in `path`."""
    out = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            out.append((name, node.lineno, node.col_offset == 0))
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges between the project's own modules (module-level and deferred imports alike)."""
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name, _, _ in imports_of(path):
            if name in mods and name != mod:
                graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_of_the_project_has_no_cycle():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 30  # the scan sees the real graph
    assert find_cycle(graph) is None


@pytest.mark.parametrize("path", sorted((REPO / "synctalk").glob("*.py")), ids=lambda p: p.name)
def test_the_library_imports_no_config_fastapi_or_entry_script(path):
    bad = [(name, line) for name, line, _ in imports_of(path)
           if name.split(".")[0] in FORBIDDEN_IN_LIBRARY]
    assert not bad, f"{path.name} imports {bad}"


def test_networks_import_only_the_library():
    for name in NETWORKS:
        bad = [(m, line) for m, line, _ in imports_of(REPO / f"{name}.py")
               if m.split(".")[0] in ENTRY_SCRIPTS | {"services", "data_utils", "fastapi"}]
        assert not bad, f"{name}.py imports {bad}"


def test_no_module_patches_sys_path():
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                 if ".venv" not in p.parts and "sys.path.insert" in p.read_text() and p.name != Path(__file__).name]
    assert not offenders


def test_the_timing_contract_is_defined_once():
    """16 kHz / 25 fps / 640 samples are named in synctalk/timing.py and nowhere else in the code."""
    pattern_names = ("SAMPLE_RATE =", "FPS =", "SAMPLES_PER_FRAME =", "WINDOW =")
    homes = []
    for p in list(REPO.glob("*.py")) + [q for d in SOURCE_DIRS for q in (REPO / d).rglob("*.py")]:
        for line in p.read_text().splitlines():
            if line.startswith(pattern_names):
                homes.append((p.name, line.split("=")[0].strip()))
    assert sorted(homes) == [("timing.py", "FPS"), ("timing.py", "SAMPLES_PER_FRAME"), ("timing.py", "SAMPLE_RATE"),
                             ("timing.py", "WINDOW")]
