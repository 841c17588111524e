"""`actcomp fleet`: many boards fine-tune one artifact together on Flower's deployment
runtime (a SuperLink, one SuperNode per board, `flwr run`).

``fleet local`` runs the whole fleet on this machine, on 127.0.0.1 only: it shards the
data, starts a SuperLink and K SuperNodes as processes (restarted if one dies, as a
board's service manager would), runs the app, and stops every process it started.
``fleet run`` runs the app on a SuperLink that real boards are connected to.
The ClientApp is device_runner.fleet, the ServerApp actcomp_edge.host.fleet_server; this module
imports neither (nor flwr): it writes files and runs processes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ..core.npz import write_atomic
from ..core.profiles import load_profile
from ..core.schedules import parse_schedule

MIN_SHARD = 4            # images every node's shard must have
STOP_SECONDS = 10        # SIGTERM, then SIGKILL after this long
MAX_RESTARTS = 5         # a node that exits more often is left down and the run fails
FLWR_RANGE = (1, 42)     # the tested flwr: 1.42.x


# ---- data: one shard per node -------------------------------------------------------

def parse_partition(text: str) -> tuple:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    if text == "iid":
        return ("iid", None)
    kind, _, alpha = text.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = -1.0
    if kind != "dirichlet" or not (value > 0 and np.isfinite(value)):
        raise ValueError(f"--partition must be iid or dirichlet:ALPHA with ALPHA > 0, "
                         f"got {text!r}")
    return ("dirichlet", value)


def partition(labels: np.ndarray, nodes: int, scheme: tuple, seed: int = 0,
              min_size: int = MIN_SHARD) -> list:
    """Indices of each node's shard. iid: a seeded shuffle cut in equal parts. dirichlet:a:
    each class c is cut across the nodes in proportions p_c ~ Dir(a, ..., a) (Hsu et al.
    2019); drawn again until every shard has >= min_size images."""
    rng = np.random.default_rng(seed)
    if len(labels) < nodes * min_size:
        raise ValueError(f"{len(labels)} images cannot give {nodes} nodes {min_size} each")
    if scheme[0] == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), nodes)]
    for _ in range(1000):
        shards = [[] for _ in range(nodes)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(nodes, scheme[1]))
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, np.int64)) for s in shards]
    raise ValueError(f"dirichlet:{scheme[1]} did not give each of {nodes} nodes {min_size} "
                     f"images in 1000 draws: use a larger ALPHA or fewer --nodes")


def dataset_labels(path: Path) -> tuple:
    """(labels, files or None) of an .npz or ImageFolder dataset, without decoding images."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as d:
                if "images" not in d.files:
                    raise KeyError("images")
                return np.asarray(d["labels"]).astype(np.int64), None
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read dataset {path}: {e}") from None
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{path} has no class sub-folders (expected {path}/<class>/<image>)")
    files = [(f, c) for c, name in enumerate(classes)
             for f in sorted((path / name).rglob("*")) if f.is_file()]
    return np.asarray([c for _, c in files], np.int64), (classes, [f for f, _ in files])


def write_shards(path: Path, labels: np.ndarray, listing, shards: list, folder: Path) -> list:
    """Write each shard as the node's own dataset: an .npz of its rows, or an ImageFolder of
    symlinks (every class folder present, possibly empty). labels, listing: dataset_labels'
    of path. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    if listing is None:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in ("images", "labels", "classes") if k in d.files}
        for i, rows in enumerate(shards):
            target = folder / f"node-{i}.npz"
            np.savez(target, **{k: v if k == "classes" else v[rows] for k, v in arrays.items()})
            out.append(target)
        return out
    classes, files = listing
    for i, rows in enumerate(shards):
        target = folder / f"node-{i}"
        for name in classes:
            (target / name).mkdir(parents=True, exist_ok=True)
        for row in rows:
            link = target / classes[labels[row]] / f"{row:06d}{files[row].suffix}"
            if not link.exists():
                link.symlink_to(files[row].resolve())
        out.append(target)
    return out


# ---- processes ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_table() -> dict:
    """pid -> (ppid, pgid) of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                pass
    return table


def tree(pid: int, table: dict | None = None) -> list:
    """pid and all its descendants."""
    table = table or process_table()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(c for c, (ppid, _) in table.items() if ppid == p)
    return found


def status_bytes(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode().rsplit("/", 1)[-1]
    except (OSError, IndexError):
        return ""


class Processes:
    """The processes a fleet started, each in its own process group; every group any of
    their descendants was seen in is remembered, so stop() leaves no orphan. keep_alive()
    starts again a process that exits, as a board's service manager would."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env = folder, env
        self.procs = {}   # name -> (Popen, argv, env)
        self.groups = set()
        self.stopping = False
        self.lock = threading.Lock()
        self.watcher = None
        self.restarts = {}  # name -> times started again
        self.failure = None  # why keep_alive gave up, if it did
        self.app = None      # the `flwr run` process, ended when keep_alive gives up

    def start(self, name: str, argv: list, env: dict | None = None):
        """Start argv as `name` (its output to FOLDER/name.log); None once stopping."""
        with self.lock:
            if self.stopping:
                return None
            with open(self.folder / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        env=env or self.env, start_new_session=True)
            self.procs[name] = (proc, argv, env)
            self.groups.add(proc.pid)
        return proc

    def watch(self) -> None:
        """Remember the groups of every descendant (call now and then)."""
        table = process_table()
        with self.lock:
            for proc, _, _ in self.procs.values():
                if proc.poll() is None:
                    self.groups.update(table[p][1] for p in tree(proc.pid, table) if p in table)

    def keep_alive(self, names: list, give_up, limit: int = MAX_RESTARTS) -> None:
        """In a thread: start a process of names again when it exits, after 0, 1, 2, 4 ...
        s; after `limit` restarts of one, call give_up(message) and stop restarting it."""
        def loop():
            due = {}
            while not self.stopping:
                self.watch()
                for name in names:
                    proc, argv, env = self.procs[name]
                    if proc.poll() is None or self.restarts.get(name, 0) > limit:
                        continue
                    count = self.restarts.get(name, 0)
                    if count == limit:
                        self.restarts[name] = count + 1
                        give_up(f"{name} exited {limit + 1} times ({describe_exit(proc.returncode)}"
                                f"; log {self.folder / (name + '.log')})")
                        continue
                    due.setdefault(name, time.time() + (2 ** (count - 1) if count else 0))
                    if time.time() >= due[name]:
                        del due[name]
                        self.restarts[name] = count + 1
                        print(f"fleet: {name} exited ({describe_exit(proc.returncode)}): "
                              f"started again (restart {count + 1})", flush=True)
                        self.start(name, argv, env)
                time.sleep(0.5)

        self.watcher = threading.Thread(target=loop, daemon=True)
        self.watcher.start()

    def flower_rss(self, name: str) -> int:
        """Peak RSS (VmHWM) of the Flower processes of a node, its ClientApp runs excluded."""
        proc = self.procs[name][0]
        return sum(status_bytes(p, "VmHWM") for p in tree(proc.pid)
                   if command_name(p) != "flwr-clientapp")

    def stop(self) -> None:
        """SIGTERM every remembered group, SIGKILL what is left after STOP_SECONDS."""
        with self.lock:
            self.stopping = True
        if self.watcher is not None:
            self.watcher.join()
        self.watch()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in self.alive_groups():
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.time() + (STOP_SECONDS if sig == signal.SIGTERM else 5)
            while time.time() < deadline and self.alive_groups():
                time.sleep(0.1)
            for proc, _, _ in self.procs.values():
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if not self.alive_groups():
                return

    def alive_groups(self) -> set:
        """The remembered groups that still hold a live fleet process (a group whose
        processes all ended is not signalled: its id may have been reused)."""
        return {g for pid, (_, g) in process_table().items()
                if g in self.groups and _alive(pid) and is_fleet_process(pid)}


def is_fleet_process(pid: int) -> bool:
    """Whether pid's command line runs one of Flower's commands (flower-*, flwr*) or the
    runner (the ServerApp's central evaluation)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(word in cmdline for word in (b"flower-", b"flwr", b"device_runner"))


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


# ---- the Flower app -------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_app(folder: Path, run_config: dict) -> Path:
    """The Flower app: a pyproject naming the installed ServerApp and ClientApp, with this
    run's settings as its run config."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"',
             '', '[project]', 'name = "actcomp-fleet"', 'version = "1.0.0"',
             'description = "actcomp-edge fleet fine-tuning"', 'license = "MIT"',
             'dependencies = []', '', '[tool.flwr.app]', 'publisher = "actcomp-edge"', '',
             '[tool.flwr.app.components]', 'serverapp = "actcomp_edge.host.fleet_server:app"',
             'clientapp = "device_runner.fleet:app"', '', '[tool.flwr.app.config]']
    lines += [f"{key} = {toml_value(value)}" for key, value in run_config.items()]
    write_atomic(folder / "pyproject.toml", ("\n".join(lines) + "\n").encode())
    return folder


def write_flwr_home(folder: Path, superlink: str) -> Path:
    """A FLWR_HOME whose only SuperLink connection is ours (the user's ~/.flwr untouched)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.toml", (
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = {toml_value(superlink)}\n'
        f'insecure = true\n').encode())
    return folder


def flwr_version() -> str:
    """The installed flwr's version, or a one-line error naming the extra."""
    try:
        found = version("flwr")
    except PackageNotFoundError:
        raise ValueError("actcomp fleet needs Flower: pip install 'actcomp-edge[fleet]'") from None
    if tuple(int(p) for p in found.split(".")[:2]) != FLWR_RANGE:
        raise ValueError(f"actcomp fleet is tested with flwr {FLWR_RANGE[0]}.{FLWR_RANGE[1]}.x, "
                         f"found {found}: pip install 'actcomp-edge[fleet]'")
    return found


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it listened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def failure_reason(text: str) -> str:
    """Flower's "<class 'X'>:<'message'>" -> message."""
    found = re.match(r"<class '[\w.]+'>:<'(.*)'>$", text, re.S)
    return found.group(1) if found else text


# ---- the summary ------------------------------------------------------------------------

def read_rounds(journal: Path) -> list:
    if not journal.is_file():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]


def summarize(records: list, flower_rss: dict, extra: dict) -> dict:
    """The fleet's summary: per round (accuracy, loss, bytes), per node (memory)."""
    rounds = [{"round": r["round"], "val_accuracy": r["val_accuracy"], "loss": r["loss"],
               "bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"],
               "nodes_replied": len(r["nodes"]),
               "failures": [failure_reason(f["reason"]) for f in r["failures"]]}
              for r in records]
    nodes = {}
    for r in records:
        for n in r["nodes"]:
            seen = nodes.setdefault(n["node"], {
                "node": n["node"], "rounds": [], "examples": n["num-examples"],
                "peak_rss_bytes": 0, "working_set_bytes": 0,
                "budget_bytes": n["budget_bytes"] or None,  # 0 in the reply: no budget
                "budget_violations": 0, "client_entry_rss_bytes": 0})
            seen["rounds"].append(r["round"])
            seen["peak_rss_bytes"] = max(seen["peak_rss_bytes"], n["peak_rss_bytes"])
            seen["working_set_bytes"] = max(seen["working_set_bytes"], n["working_set_bytes"])
            seen["client_entry_rss_bytes"] = max(seen["client_entry_rss_bytes"],
                                                 n["entry_rss_bytes"])
            seen["budget_violations"] += n["budget_violations"]
            seen["mean_ranks"] = n.get("mean_ranks")
            if n.get("state_from"):
                seen.setdefault("state_from", []).append([r["round"], n["state_from"]])
    for name, rss in flower_rss.items():
        entry = nodes.setdefault(name, {"node": name, "rounds": []})
        entry["flower_processes_peak_rss_bytes"] = rss
    return dict(extra, rounds=rounds, nodes=[nodes[k] for k in sorted(nodes)])


# ---- running ----------------------------------------------------------------------------

def run_config(args, out: Path, nodes: int) -> dict:
    """The ServerApp's settings (actcomp_edge.host.fleet_server's table)."""
    return {"artifact": str(Path(args.artifact).resolve()),
            "val-data": str(Path(args.val_data).resolve()), "out": str(out.resolve()),
            "rounds": args.rounds, "min-nodes": nodes, "strategy": args.strategy,
            "proximal-mu": args.proximal_mu, "server-lr": args.server_lr,
            "local-epochs": args.local_epochs, "lr": args.lr or 0.0, "schedule": args.schedule,
            "seed": args.seed, "round-timeout": args.round_timeout,
            "threads": args.threads or max(1, (os.cpu_count() or 1) // max(1, nodes))}


def run_app(app: Path, home: Path, env: dict, log_path: Path, done: Path,
            procs: Processes | None = None) -> None:
    """`flwr run APP fleet --stream`; its log to log_path, the fleet's own lines echoed.
    Raises RuntimeError with the ServerApp's last error when the run did not finish (or
    with procs.failure, when keep_alive gave up on a node and ended the run)."""
    argv = [str(Path(sys.executable).parent / "flwr"), "run", str(app), "fleet", "--stream"]
    with open(log_path, "w") as log, subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(env, FLWR_HOME=str(home))) as proc:
        if procs is not None:
            procs.app = proc
        errors = []
        for line in proc.stdout:
            log.write(line)
            log.flush()
            text = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
            if text.startswith("fleet:"):
                print(text, flush=True)
            elif "ERROR" in text or "Error" in text or text.startswith("│"):
                errors.append(text)
        proc.wait()
    if procs is not None and procs.failure:
        raise RuntimeError(f"the fleet run was stopped: {procs.failure}")
    if not done.is_file():
        detail = "; ".join(e.strip("│ ") for e in errors[-3:] if e.strip("│ ")) or \
            f"flwr run exited with code {proc.returncode}"
        raise RuntimeError(f"the fleet run did not finish: {detail} (log: {log_path})")


def check_inputs(args) -> list:
    """One-line ValueErrors before any work; returns the nodes' profiles."""
    from ..core.manifest import load_manifest
    load_manifest(args.artifact, None)
    for flag, path in (("--data", getattr(args, "data", None)), ("--val-data", args.val_data)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{flag} {path}: no such file or directory")
    if args.strategy != "fedprox" and args.proximal_mu:
        raise ValueError("--proximal-mu is FedProx's: give --strategy fedprox")
    if args.schedule:
        parse_schedule(args.schedule)
    if args.out and Path(args.out).exists() and (not Path(args.out).is_dir()
                                                 or any(Path(args.out).iterdir())):
        raise ValueError(f"--out {args.out} is not an empty folder: give a new one (what is "
                         f"there is kept)")
    if args.summary and not Path(args.summary).resolve().parent.is_dir():
        raise ValueError(f"--summary {args.summary}: its folder does not exist")
    return [load_profile(name)  # ProfileError is a ValueError
            for name in (args.profile.split(",") if getattr(args, "profile", None) else [])]


def run_folder(args) -> Path:
    """The run's folder (new or empty), with logs/ in it."""
    out = Path(args.out) if args.out else \
        Path(args.artifact) / "fleet" / time.strftime("%Y%m%d-%H%M%S")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    return out


def flower_env() -> dict:
    """This environment with its Flower commands first on PATH (flwr starts them by name)."""
    bin_dir = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONUNBUFFERED="1")


def node_argv(args, i: int, port: int, shard: Path, out: Path, profiles: list,
              threads: int) -> list:
    """`flower-supernode` for local node i: its shard, folder, profile and threads."""
    node = {"artifact": str(Path(args.artifact).resolve()), "data": str(shard.resolve()),
            "out": str((out / "nodes" / f"node-{i}").resolve()), "name": f"node-{i}",
            "threads": threads}
    if profiles:
        node["profile"] = str(Path(profiles[i % len(profiles)].path).resolve())
    if args.batch_size:
        node["batch-size"] = args.batch_size
    return [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink",
            f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config",
            " ".join(f"{k}={toml_value(v)}" for k, v in node.items())]


def run_local(args) -> int:
    """`actcomp fleet local`."""
    found = flwr_version()
    profiles = check_inputs(args)
    scheme = parse_partition(args.partition)
    labels, listing = dataset_labels(Path(args.data))
    shards = partition(labels, args.nodes, scheme, args.seed)
    out = run_folder(args)
    paths = write_shards(Path(args.data), labels, listing, shards, out / "shards")
    sizes = [len(s) for s in shards]
    print(f"fleet: {args.nodes} nodes, shards of {sizes} images ({args.partition}); "
          f"{args.rounds} rounds of {args.local_epochs} local epochs, {args.strategy}; "
          f"folder {out}")
    env, port = flower_env(), free_port()
    config = run_config(args, out / "server", args.nodes)
    app = write_app(out / "app", config)
    home = write_flwr_home(out / "flwr-home", f"127.0.0.1:{port}")
    procs = Processes(out / "logs", dict(env, FLWR_HOME=str(home)))
    names = [f"node-{i}" for i in range(args.nodes)]
    started, flower_rss = time.time(), {}

    def give_up(message: str) -> None:  # a node that keeps dying: the run cannot finish
        procs.failure = message
        if procs.app is not None:
            procs.app.terminate()

    try:
        superlink = procs.start("superlink", [
            str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--host",
            "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"])
        wait_for_port(port, superlink, "flower-superlink")
        for i, name in enumerate(names):
            procs.start(name, node_argv(args, i, port, paths[i], out, profiles,
                                        config["threads"]))
        write_atomic(out / "fleet.json", json.dumps({
            "superlink_port": port,
            "pids": {k: p.pid for k, (p, _, _) in procs.procs.items()}}, indent=1).encode())
        procs.keep_alive(names, give_up)
        run_app(app, home, env, out / "logs" / "flwr-run.log", out / "server" / "done.json",
                procs)
        flower_rss = {name: procs.flower_rss(name) for name in names}
    finally:
        procs.stop()
        write_atomic(out / "fleet.json", json.dumps({
            "superlink_port": port, "pids": {k: p.pid for k, (p, _, _) in procs.procs.items()},
            "groups": sorted(procs.groups)}, indent=1).encode())
    summary = summarize(read_rounds(out / "server" / "fleet.jsonl"), flower_rss, {
        "flwr_version": found, "strategy": args.strategy, "partition": args.partition,
        "nodes_started": args.nodes, "shard_sizes": sizes,
        "shard_label_counts": [np.bincount(labels[s], minlength=int(labels.max()) + 1).tolist()
                               for s in shards],
        "local_epochs": args.local_epochs, "restarts": dict(procs.restarts),
        "wall_seconds": round(time.time() - started, 1),
        "outputs": {"global_weights": str(out / "server" / "global_weights.npz"),
                    "journal": str(out / "server" / "fleet.jsonl"), "folder": str(out)}})
    write_summary(Path(args.summary) if args.summary else out / "summary.json", summary)
    print_summary(summary)
    return 0


def run_remote(args) -> int:
    """`actcomp fleet run --superlink HOST:PORT`: the app on a SuperLink boards connect to.
    Run it on the SuperLink's machine: the ServerApp writes the journal and weights there."""
    found = flwr_version()
    check_inputs(args)
    out = run_folder(args)
    config = run_config(args, out / "server", args.min_nodes)
    app = write_app(out / "app", config)
    home = write_flwr_home(out / "flwr-home", args.superlink)
    started = time.time()
    print(f"fleet: {args.rounds} rounds on the SuperLink {args.superlink}, waiting for "
          f"{args.min_nodes} nodes; folder {out}")
    run_app(app, home, flower_env(), out / "logs" / "flwr-run.log", out / "server" / "done.json")
    summary = summarize(read_rounds(out / "server" / "fleet.jsonl"), {}, {
        "flwr_version": found, "strategy": args.strategy, "superlink": args.superlink,
        "local_epochs": args.local_epochs, "wall_seconds": round(time.time() - started, 1),
        "outputs": {"global_weights": str(out / "server" / "global_weights.npz"),
                    "journal": str(out / "server" / "fleet.jsonl"), "folder": str(out)}})
    write_summary(Path(args.summary) if args.summary else out / "summary.json", summary)
    print_summary(summary)
    return 0


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def write_summary(path: Path, summary: dict) -> None:
    write_atomic(path, (json.dumps(summary, indent=1) + "\n").encode())


def print_summary(summary: dict) -> None:
    mib = 2 ** 20
    for r in summary["rounds"]:
        print(f"round {r['round']}: val accuracy {r['val_accuracy']:.4f}, "
              f"{r['nodes_replied']} nodes, {r['bytes_sent'] / mib:.2f} MiB sent, "
              f"{r['bytes_received'] / mib:.2f} MiB received"
              + (f"; left out: {'; '.join(r['failures'])}" if r["failures"] else ""))
    for n in summary["nodes"]:
        if "peak_rss_bytes" in n:
            print(f"{n['node']}: {n['examples']} images, peak RSS {n['peak_rss_bytes'] / mib:.1f} "
                  f"MiB, working set {n['working_set_bytes'] / mib:.1f} MiB"
                  + (f" of {n['budget_bytes'] / mib:.1f} MiB" if n.get("budget_bytes") else "")
                  + f", {n['budget_violations']} budget violations")
    print(f"global weights: {summary['outputs']['global_weights']}")
