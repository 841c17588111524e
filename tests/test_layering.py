"""The architecture as folder rules, read from the source (every import, also inside
functions). Four folders, each a layer:

    actcomp_edge/core   numpy only: what the board and the exporter share
    device_runner       the board: core + onnxruntime, never torch, onnx or the host tools
    export              the workstation: core + torch/onnx, never the runner or the host tools
    actcomp_edge/host   the host tools: core + the exporter's CLI; they run the board as a process

and no library module imports a command line, no module imports itself through others, and
no function is over 80 lines or takes more than 10 parameters."""
import ast
from pathlib import Path

from helpers import REPO

FOLDERS = {"core": "actcomp_edge.core", "device": "device_runner", "export": "export",
           "host": "actcomp_edge.host"}
# the folders each folder may import from (besides itself)
ALLOWED = {"core": set(), "device": {"core"}, "export": {"core"}, "host": {"core", "export"}}
# third-party packages each folder may import (the standard library is always allowed)
THIRD_PARTY = {"core": {"numpy", "tomli", "serial"},
               "device": {"numpy", "onnxruntime", "threadpoolctl", "serial", "flwr", "PIL"},
               "export": {"numpy", "torch", "onnx", "onnxruntime", "safetensors"},
               "host": {"numpy", "matplotlib", "serial", "flwr"}}
COMMANDS = {"actcomp_edge.host.cli", "device_runner.cli", "export.cli"}


def modules() -> dict:
    """Dotted module name -> path, for every module of the three packages."""
    found = {}
    for package in ("actcomp_edge", "device_runner", "export"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def folder(module: str) -> str | None:
    """The layer a module belongs to (None: a package's own __init__ above the layers)."""
    for name, prefix in FOLDERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def imported(name: str, path: Path):
    """(module, alias) pairs of every import in a module; relative ones resolved."""
    here = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            yield from ((base, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)


def import_graph() -> dict:
    """module -> the project modules it imports (``from P import m`` names module P.m)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for base, alias in imported(name, path):
            full = f"{base}.{alias}" if alias else base
            targets.add(full if full in known else base)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def third_party(name: str, path: Path) -> set:
    """Top-level names of the non-project packages a module imports."""
    return {base.split(".")[0] for base, _ in imported(name, path)} - \
        {"actcomp_edge", "device_runner", "export", ""}


def reachable(graph: dict, starts) -> set:
    seen, todo = set(), list(starts)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_the_graph_is_read():
    graph = import_graph()
    assert "actcomp_edge.core.decomposition" in graph["actcomp_edge.core.methods"]
    assert "device_runner.runtime" in graph["device_runner.train"]          # relative import
    assert "actcomp_edge.core.memory" in graph["actcomp_edge.host.cli"]     # from ..core
    assert "export.cli" in graph["actcomp_edge.host.cli"]
    assert "export.module_export" in graph["actcomp_edge.host.cli"]         # inside a function
    assert "actcomp_edge.host.fleet" in graph["actcomp_edge.host.cli"]
    assert {folder(m) for m in graph} == {None, *FOLDERS}


def test_each_folder_imports_only_the_folders_below_it():
    graph = import_graph()
    for module, targets in graph.items():
        layer = folder(module)
        if layer is None:
            assert not targets, module
            continue
        for target in targets:
            # the top package holds only __version__
            assert folder(target) in ALLOWED[layer] | {layer, None}, f"{module} imports {target}"


NEWER_STDLIB = {"_sha2"}  # CPython >= 3.12's SHA-2 module (core.manifest falls back to it)


def test_each_folder_imports_only_its_third_party_packages():
    import sys
    stdlib = set(sys.stdlib_module_names) | NEWER_STDLIB
    for module, path in modules().items():
        layer = folder(module)
        outside = {p for p in third_party(module, path) if p not in stdlib}
        assert outside <= THIRD_PARTY.get(layer, set()), f"{module}: {outside}"


def test_the_core_holds_only_what_the_board_or_the_exporter_uses():
    """A module in the core that only the host tools import belongs in host/."""
    graph = import_graph()
    used = reachable(graph, {m for m in graph if folder(m) in ("device", "export")})
    core = {m for m in graph if folder(m) == "core" and not m.endswith(".core")}
    assert core <= used, core - used


def test_no_library_module_imports_a_command_line_module():
    """The command lines (and the demo, which drives one) sit on top: what they share lives
    in a library module."""
    graph = import_graph()
    assert COMMANDS <= set(graph)
    assert {m for m, targets in graph.items() if targets & COMMANDS} - COMMANDS == \
        {"actcomp_edge.host.demo"}


def test_no_import_cycles():
    graph = import_graph()
    for name in graph:
        assert name not in reachable(graph, graph[name]), name


def test_no_function_is_over_80_lines_or_10_parameters():
    """Long functions hide their steps: a step of its own gets a name (self, cls not counted)."""
    too_long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p for p in a.posonlyargs + a.args + a.kwonlyargs
                          if p.arg not in ("self", "cls")] + [p for p in (a.vararg, a.kwarg) if p]
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 or len(params) > 10:
                    too_long.append(f"{module}.{node.name}: {lines} lines, {len(params)} params")
    assert not too_long, too_long


def test_the_benchmarks_and_tools_import_what_the_packages_hold():
    """benchmarks/ and tools/ are scripts no other test imports: every name they take from
    the three packages (also inside functions) must exist, or a move leaves them broken."""
    import importlib
    known = modules()
    missing = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")) + sorted((REPO / "tools").glob("*.py")):
        for base, alias in imported(path.stem, path):
            if base.split(".")[0] not in ("actcomp_edge", "device_runner", "export"):
                continue
            if base not in known:
                missing.append(f"{path.name}: {base}")
            elif alias and f"{base}.{alias}" not in known and \
                    not hasattr(importlib.import_module(base), alias):
                missing.append(f"{path.name}: {base}.{alias}")
    assert not missing, missing
