"""The import graph of the three packages, read from the source (every import, also inside
functions): the device side never reaches the exporter or the host tools, the exporter
never reaches the host tools or the runner, the host tools run the board's side as a
process, and no module imports itself through others."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actcomp_edge", "device_runner", "export")
HOST = {"actcomp_edge.cli", "actcomp_edge.demo", "actcomp_edge.monitor", "actcomp_edge.report",
        "actcomp_edge.fleet", "actcomp_edge.fleet_server"}
DEVICE_ROOTS = {"actcomp_edge.decomposition", "actcomp_edge.methods", "actcomp_edge.program",
                "actcomp_edge.arch", "actcomp_edge.protocol",
                "actcomp_edge.manifest", "actcomp_edge.memplan", "actcomp_edge.npz"}


def modules() -> dict:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def import_graph() -> dict:
    """module -> the project modules it imports (``from P import m`` names module P.m)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name.split(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (f"{package}.{node.module}" if node.module else package) if node.level \
                    else node.module
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


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
    assert "actcomp_edge.decomposition" in graph["actcomp_edge.methods"]
    assert "device_runner.runtime" in graph["device_runner.train"]   # relative import
    assert "export.cli" in graph["actcomp_edge.cli"]                 # import inside a function
    assert "actcomp_edge.fleet" in graph["actcomp_edge.cli"]


def test_the_device_side_reaches_neither_the_exporter_nor_the_host_tools():
    graph = import_graph()
    device = reachable(graph, DEVICE_ROOTS | {m for m in graph if m.startswith("device_runner")})
    assert not {m for m in device if m.startswith("export")}
    assert not device & HOST


def third_party(path: Path) -> set:
    """Top-level names of the packages a module imports (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names


def test_no_library_module_imports_a_command_line_module():
    """The command lines (and the demo, which drives one) sit on top: what they share lives
    in a library module."""
    commands = {"actcomp_edge.cli", "device_runner.cli", "export.cli"}
    graph = import_graph()
    assert commands <= set(graph)
    assert {m for m, targets in graph.items() if targets & commands} - commands == \
        {"actcomp_edge.demo"}


def test_the_device_side_imports_neither_torch_nor_onnx():
    graph, paths = import_graph(), modules()
    device = reachable(graph, DEVICE_ROOTS | {m for m in graph if m.startswith("device_runner")})
    assert {"actcomp_edge.methods", "actcomp_edge.program"} <= device
    for module in device:
        assert not third_party(paths[module]) & {"torch", "onnx"}, module


def test_the_exporter_reaches_neither_the_host_tools_nor_the_runner():
    graph = import_graph()
    exporter = reachable(graph, {m for m in graph if m.startswith("export")})
    assert not exporter & HOST
    assert not {m for m in exporter if m.startswith("device_runner")}


def test_the_host_tools_run_the_board_side_as_a_process():
    graph = import_graph()
    for name in HOST:
        assert not {m for m in reachable(graph, {name}) if m.startswith("device_runner")}, name


def test_no_import_cycles():
    graph = import_graph()
    for name in graph:
        assert name not in reachable(graph, graph[name]), name
