"""The fleet's Flower ServerApp (host): Flower's FedAvg, FedProx or FedAdam over the
artifact's trainable parameters, central evaluation after every round, a round-by-round
JSONL. Flower runs it (`flwr run`); `actcomp fleet` writes its run config:

| key          | meaning                                                         |
|--------------|-----------------------------------------------------------------|
| artifact     | training artifact folder: its weights.npz is round 0's global   |
| val-data     | central evaluation images (`actcomp-device eval`, a process)    |
| out          | fleet.jsonl, global/round-R.npz, global_weights.npz             |
| rounds       | rounds of federated training                                    |
| min-nodes    | nodes that must be connected before a round starts              |
| strategy     | fedavg, fedprox or fedadam                                      |
| proximal-mu  | FedProx's mu                                                    |
| server-lr    | FedAdam's eta                                                   |
| local-epochs, lr, schedule, seed | sent to every node each round (lr 0: the node's default) |
| round-timeout| seconds a round waits for its replies                           |
| threads      | threads of the central evaluation                               |
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from ..core.npz import load_npz, save_npz, write_atomic

def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's payload (each array's serialized data)."""
    return sum(len(array.data) for array in record.values())


def empty_round() -> dict:
    """What a round went through the grid with: bytes each way, replies, failures."""
    return {"bytes_sent": 0, "bytes_received": 0, "nodes": [], "failures": []}


class RecordingGrid:
    """Flower's Grid, and what went through it per round: bytes each way, every reply."""

    def __init__(self, grid):
        self.grid = grid
        self.rounds = {}

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        if not train:  # the (disabled) client-side evaluation
            return replies
        server_round = int(train[0].content["config"]["server-round"])
        entry = self.rounds.setdefault(server_round, empty_round())
        entry["bytes_sent"] += sum(record_bytes(m.content["arrays"]) for m in train)
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                entry["failures"].append({"node_id": node_id, "reason": reply.error.reason})
                continue
            entry["bytes_received"] += record_bytes(reply.content["arrays"])
            info = dict(reply.content["node"]) if "node" in reply.content else {}
            entry["nodes"].append(dict(
                {"node": info.get("name", str(node_id)), "node_id": node_id},
                **{k: finite(v) for k, v in dict(reply.content["metrics"]).items()},
                resumed=bool(info.get("resumed")), state_from=info.get("state_from") or None,
                mean_ranks=json.loads(info.get("mean_ranks") or "{}")))
        return replies


def finite(value):
    """A metric as JSON can hold it: NaN / inf become None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def central_accuracy(artifact: str, weights: Path, val_data: str, threads: int) -> float:
    """`actcomp-device eval` of weights on val_data, as a process (the host tools do not
    import the runner)."""
    done = subprocess.run([sys.executable, "-m", "device_runner.cli", "eval", artifact,
                           "--weights", str(weights), "--data", val_data,
                           "--threads", str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"central evaluation failed: {last}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["accuracy"])


app = ServerApp()


@app.main()
def main(grid, context) -> None:
    cfg = dict(context.run_config)
    out = Path(cfg["out"])
    (out / "global").mkdir(parents=True, exist_ok=True)
    journal = out / "fleet.jsonl"
    journal.write_text("")
    initial = load_npz(Path(cfg["artifact"]) / "weights.npz")
    names = sorted(initial)
    strategy_name = cfg["strategy"]
    nodes = int(cfg["min-nodes"])
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                  min_available_nodes=nodes, min_evaluate_nodes=0)
    if strategy_name == "fedprox":
        strategy = FedProx(proximal_mu=float(cfg["proximal-mu"]), **common)
    elif strategy_name == "fedadam":
        strategy = FedAdam(eta=float(cfg["server-lr"]), **common)
    else:
        strategy = FedAvg(**common)
    recording = RecordingGrid(grid)
    started = time.time()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        entry = recording.rounds.get(server_round, empty_round())
        if entry["failures"] and not entry["nodes"]:  # nothing can improve: stop, say why
            raise RuntimeError(f"round {server_round}: every node failed: "
                               f"{entry['failures'][0]['reason']}")
        # the artifact's dtypes (FedAdam's update comes back as float64)
        weights = {k: arrays[k].numpy().astype(initial[k].dtype, copy=False) for k in names}
        path = out / "global" / f"round-{server_round:04d}.npz"
        save_npz(path, weights)
        accuracy = central_accuracy(cfg["artifact"], path, cfg["val-data"], int(cfg["threads"]))
        counted = [n for n in entry["nodes"] if n["loss"] is not None]
        examples = sum(n["num-examples"] for n in counted)
        loss = (sum(n["loss"] * n["num-examples"] for n in counted) / examples
                if examples else None)
        record = dict({"type": "round", "round": server_round, "val_accuracy": accuracy,
                       "loss": loss, "seconds": round(time.time() - started, 1),
                       "weights": str(path)}, **entry)
        with journal.open("a") as f:
            f.write(json.dumps(record) + "\n")
        save_npz(out / "global_weights.npz", weights)
        print(f"fleet: round {server_round}: val accuracy {accuracy:.4f}"
              + (f", train loss {loss:.4f}" if loss is not None else "")
              + f", {len(entry['nodes'])} nodes replied, {len(entry['failures'])} failed",
              flush=True)
        return MetricRecord({"val_accuracy": accuracy})

    strategy.start(grid=recording, initial_arrays=ArrayRecord(
        {k: Array.from_numpy_ndarray(initial[k]) for k in names}),
        num_rounds=int(cfg["rounds"]), timeout=float(cfg["round-timeout"]),
        train_config=ConfigRecord({"local-epochs": int(cfg["local-epochs"]),
                                   "rounds": int(cfg["rounds"]),
                                   "lr": float(cfg["lr"]), "schedule": str(cfg["schedule"]),
                                   "seed": int(cfg["seed"])}),
        evaluate_fn=evaluate)
    write_atomic(out / "done.json", json.dumps({"rounds": int(cfg["rounds"]),
                                                "strategy": strategy_name}).encode())
