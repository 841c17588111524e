"""The board's Flower ClientApp (numpy + onnxruntime + flwr; never torch).

Each round: the global trainable weights in, ``local-epochs`` of the runner's fine-tuning
(its recipe, checkpoints, the node's budget), the new weights and the node's metrics out.
A SuperNode runs it with ``--node-config "artifact=DIR data=PATH [key=value ...]"``:

| key              | meaning                                                   | default         |
|------------------|-----------------------------------------------------------|-----------------|
| artifact         | training artifact folder (`actcomp export`)               | required        |
| data             | this node's images: ImageFolder directory or .npz         | required        |
| out              | the node's folder: a sub-folder per round, checkpoints    | ARTIFACT/fleet  |
| name             | the node's name in the fleet's summary                    | HOST-NODEID     |
| profile          | device profile (.toml or name): budget and cores          | none            |
| budget           | memory budget of the training working set, e.g. 48MiB     | the profile's   |
| threads          | onnxruntime and BLAS threads                              | the profile's   |
| batch-size       | local batch                                               | the artifact's  |
| val-data         | local held-out images, evaluated after each local epoch   | none            |
| report           | stream memory profiles to `actcomp monitor` (a --report URL) | none         |
| checkpoint-every | checkpoint every K local steps (and at every epoch end)   | 50              |

The round's settings come from the ServerApp (ConfigRecord ``config``): server-round,
rounds, local-epochs, lr (0: the recipe's default), schedule, seed, proximal-mu (FedProx).
The lr schedule runs once over all the rounds, as it would over a centralised run's epochs:
round r trains the r-th of ``rounds`` equal parts of it.
A node that cannot train (its budget cannot hold the artifact, bad data) raises: Flower
turns that into an error reply naming the reason, and the strategy leaves the node out.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcomp_edge.core import names, schedules
from actcomp_edge.core.manifest import Train
from actcomp_edge.core.npz import load_npz, write_atomic
from actcomp_edge.core.profiles import parse_size

from . import checkpoint, procmem, recipe
from .session import Session
from .train import Options, write_summary

KEEP_ROUNDS = 2       # round folders kept on the node: this one and the one before


class NodeConfigError(ValueError):
    """A --node-config the ClientApp cannot use (one line)."""


class NodeRefused(RuntimeError):
    """This node cannot train this round; the message names the node and the reason."""


@dataclass
class Node:
    artifact: Path
    data: str
    out: Path
    name: str
    budget: int | None = None
    threads: int | None = None
    batch_size: int | None = None
    val_data: str | None = None
    report: str | None = None
    checkpoint_every: int = 50


def positive(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NodeConfigError(f"node-config {key} must be a positive integer, got {value!r}")
    return value


def node_name(config: dict, node_id: int) -> str:
    """The node's name: its node-config's, else HOST-NODEID (Flower's node id)."""
    return str(config.get("name") or f"{socket.gethostname()}-{node_id}")


def parse_node(config: dict, node_id: int = 0) -> Node:
    """A Node from a SuperNode's node_config (one-line NodeConfigError on bad input)."""
    known = {"artifact", "data", "out", "name", "profile", "budget", "threads", "batch-size",
             "val-data", "report", "checkpoint-every"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise NodeConfigError(f"node-config: unknown key {unknown[0]!r} (known: "
                              f"{', '.join(sorted(known))})")
    for key in ("artifact", "data"):
        if not config.get(key):
            raise NodeConfigError(f"node-config needs {key}=PATH")
    artifact = Path(str(config["artifact"]))
    if not (artifact / "manifest.json").is_file():
        raise NodeConfigError(f"node-config artifact={artifact}: no manifest.json there")
    for key in ("data", "val-data"):
        if key in config and not Path(str(config[key])).exists():
            raise NodeConfigError(f"node-config {key}={config[key]}: no such file or directory")
    budget = threads = None
    if "profile" in config:
        from actcomp_edge.core.profiles import ProfileError, load_profile
        try:
            profile = load_profile(str(config["profile"]))
        except ProfileError as e:
            raise NodeConfigError(f"node-config profile: {e}") from None
        budget, threads = profile.budget_bytes, profile.cores
    if "budget" in config:
        try:
            value = config["budget"]
            budget = parse_size(int(value) if str(value).strip().isdigit() else str(value))
        except ValueError as e:
            raise NodeConfigError(f"node-config budget: {e}") from None
    if "threads" in config:
        threads = positive("threads", config["threads"])
    if "report" in config:
        from .transport import check_url
        check_url(str(config["report"]))
    return Node(artifact=artifact, data=str(config["data"]),
                out=Path(str(config.get("out") or artifact / "fleet")),
                name=node_name(config, node_id), budget=budget,
                threads=threads,
                batch_size=positive("batch-size", config["batch-size"])
                if "batch-size" in config else None,
                val_data=str(config["val-data"]) if "val-data" in config else None,
                report=str(config["report"]) if "report" in config else None,
                checkpoint_every=positive("checkpoint-every", config.get("checkpoint-every", 50)))


def arrays_digest(arrays: dict) -> str:
    """SHA-256 over the names, shapes and bytes of arrays (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def round_dir(out: Path, server_round: int) -> Path:
    return out / f"round-{server_round:04d}"


def marker(folder: Path) -> dict:
    """What a round folder was started for ({"run", "round", "sha256", "config"}), or {}."""
    try:
        return json.loads((folder / "global.json").read_text())
    except (OSError, ValueError):
        return {}


def earlier_state(out: Path, server_round: int, run_id: int) -> tuple:
    """(folder, arrays) of the newest good checkpoint of an earlier round of this run, or
    (None, None): where the node's own state (optimizer, trackers, step count) continues."""
    for folder in sorted(out.glob("round-*"), reverse=True):
        if folder.name < round_dir(out, server_round).name and \
                marker(folder).get("run") == run_id:
            found = checkpoint.load_latest(folder / "checkpoints", log=checkpoint.warn)
            if found is not None:
                return folder, found[1]
    return None, None


def open_round(out: Path, identity: dict) -> tuple:
    """(folder, resume): the round's folder, kept (resume) when it was started for the same
    identity (run id, round, the global weights' digest, the round's settings), else emptied
    and marked with this identity."""
    folder = round_dir(out, identity["round"])
    if marker(folder) == identity:
        return folder, True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_atomic(folder / "global.json", json.dumps(identity, sort_keys=True).encode())
    return folder, False


def prune_rounds(out: Path, server_round: int, run_id: int) -> None:
    """Keep this run's KEEP_ROUNDS newest round folders up to this round; remove the older
    ones and those of other runs (a finished federation's intermediate state)."""
    current = round_dir(out, server_round).name
    folders = sorted(out.glob("round-*"))
    ours = [f for f in folders if marker(f).get("run") == run_id and f.name <= current]
    for folder in folders:
        if folder not in ours[-KEEP_ROUNDS:] and (folder.name <= current or
                                                  marker(folder).get("run") != run_id):
            shutil.rmtree(folder, ignore_errors=True)


def train_round(node: Node, global_params: dict, config: dict, run_id: int = 0,
                log=print) -> tuple:
    """One round on this node: (new params, metrics, info). config: the server's round
    settings (server-round, rounds, local-epochs, lr, schedule, seed, proximal-mu); run_id:
    Flower's run (a round resumes only within its run, with the same settings)."""
    entry_rss = procmem.rss_bytes()  # the Flower client process before the runner loads
    started = time.perf_counter()
    server_round = int(config["server-round"])
    # a budget the plan cannot meet: refused before the data loads
    session = Session.open(node.artifact, node.batch_size, node.budget, node.threads, log)
    check_global_params(session.trainer, global_params, node.artifact)
    train_set = session.load_data(node.data, spool_dir=node.artifact)
    val_set = session.load_data(node.val_data, spool_dir=node.artifact) if node.val_data else None

    folder, resume = open_round(node.out, {
        "run": run_id, "round": server_round, "sha256": arrays_digest(global_params),
        "config": {k: config[k] for k in sorted(config)}})
    state_from, state = earlier_state(node.out, server_round, run_id)
    done = folder / "summary.json"
    if resume and done.is_file():  # this round finished here before (the reply was lost)
        log(f"{node.name}: round {server_round} was already trained here: its result again")
        return reply(node, load_npz(folder / "weights.npz"), json.loads(done.read_text()),
                     len(train_set), entry_rss, started, resume, state_from)
    load_round_state(session.trainer, global_params, state)
    if state_from is not None:
        log(f"{node.name}: round {server_round}: the node's own state (optimizer, step "
            f"{int(session.trainer.step_count)}) from {state_from}")
    options = round_options(node, config, session.batch_size, resume,
                            session.trainer.manifest.train)
    summary = session.train(train_set, val_set, folder, options, node.report,
                            node.out / "spool")
    summary["node"] = node.name
    write_summary(done, summary)
    prune_rounds(node.out, server_round, run_id)
    return reply(node, dict(session.trainer.params), summary, len(train_set), entry_rss,
                 started, resume, state_from)


def check_global_params(trainer, global_params: dict, artifact: Path) -> None:
    """Refuse (ValueError) global weights whose names or shapes are not the trainer's."""
    mismatch = sorted(set(global_params) ^ set(trainer.params)) or sorted(
        k for k in global_params if global_params[k].shape != trainer.params[k].shape)
    if mismatch:
        raise ValueError(f"the global weights do not belong to this node's artifact "
                         f"{artifact} (first difference: {mismatch[0]})")


def load_round_state(trainer, global_params: dict, state: dict | None) -> None:
    """The global weights on the trainer, over the node's own state of an earlier round
    (optimizer, trackers, step count; None: the artifact's)."""
    arrays = dict(state) if state is not None else trainer.state_arrays()
    arrays.update({names.param(k): np.asarray(v, trainer.params[k].dtype)
                   for k, v in global_params.items()})
    trainer.load_state_arrays(arrays)


def round_options(node: Node, config: dict, batch_size: int, resume: bool,
                  recipe_train: Train) -> Options:
    """The round's Options: the server's settings (config), the node's, and the artifact's
    recipe (its manifest's train) where the server gives no lr. Round r of R trains the r-th
    of R equal parts of one lr schedule; its seed is the server's + 1000 r."""
    server_round = int(config["server-round"])
    return Options(epochs=int(config.get("local-epochs", 1)), batch_size=batch_size,
                   lr=float(config.get("lr") or 0) or recipe.default_lr(recipe_train.optimizer,
                                                                     recipe_train.momentum),
                   schedule=str(config.get("schedule") or schedules.DEFAULT_SCHEDULE),
                   seed=int(config.get("seed", 0)) + 1000 * server_round,
                   checkpoint_every=node.checkpoint_every, budget_bytes=node.budget,
                   resume=resume, proximal_mu=float(config.get("proximal-mu", 0.0)),
                   schedule_part=(server_round - 1, max(server_round, int(
                       config.get("rounds", server_round)))))


def reply(node: Node, params: dict, summary: dict, examples: int, entry_rss: int,
          started: float, resumed: bool, state_from) -> tuple:
    """(params, metrics, info) of a round from the runner's summary."""
    # None when no step ran here (resumed at the round's very end): NaN, null in the journal
    loss = summary["final_train_loss"]
    metrics = {"num-examples": examples, "loss": float("nan") if loss is None else float(loss),
               "steps": summary["steps"], "seconds": time.perf_counter() - started,
               "entry_rss_bytes": entry_rss, "baseline_rss_bytes": summary["baseline_rss_bytes"],
               "peak_rss_bytes": summary["peak_rss_bytes"],
               "working_set_bytes": summary["working_set_bytes"],
               "budget_bytes": node.budget or 0,
               "budget_violations": summary["budget_violations"]}
    info = {"name": node.name, "resumed": resumed,
            "state_from": str(state_from) if state_from is not None else "",
            "mean_ranks": json.dumps(summary["mean_ranks"])}
    return params, metrics, info


def _client_app():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        config = dict(context.node_config)
        try:  # the reply's error says which node and why; the strategy leaves it out
            node = parse_node(config, context.node_id)
            global_params = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            params, metrics, info = train_round(node, global_params,
                                                dict(msg.content["config"]), context.run_id)
        except Exception as e:
            raise NodeRefused(f"{node_name(config, context.node_id)}: "
                              f"{str(e).splitlines()[0] if str(e) else repr(e)}") from None
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v))
                                   for k, v in params.items()}),
            "metrics": MetricRecord(metrics), "node": ConfigRecord(info)}), reply_to=msg)

    return app


app = _client_app()
