"""How well asi keeps a fine-tuned conv's input, on real inputs, against the exact HOSVD at
the same ranks: the relative reconstruction error |A - A_hat| / |A| of each layer's input,
batch after batch, for

    exact       the truncated HOSVD of every batch at asi's ranks (the best Tucker form)
    asi         what the runner does (methods.Asi: the first batch's exact HOSVD fixes the
                ranks, then decomposition.subspace_step, warm-started, batch after batch)
    lagged      projecting each batch on the last step's factors, then iterating (what a
                forward graph could do without a QR between its passes)

    .venv/bin/python benchmarks/asi_fidelity.py [--layers 4] [--eps 0.8] [--batches 7]

mcunet-in1 with the tiny-training weights and ants/bees images (../shared), batch 32,
128 px; ranks by the eps rule on the first batch (asi's warm_up), then the medians over the
later batches. Writes asi_fidelity.{json,md} to benchmarks/results.
"""
from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
import sys

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from actcomp_edge.core.decomposition import hosvd, mode_product, unfold  # noqa: E402
from benchmarks import write_results  # noqa: E402
from actcomp_edge.core.methods import Asi  # noqa: E402
from export import zoo  # noqa: E402

WEIGHTS = SHARED / "weights" / "tt_mcunet-5fps_int8dq"
BATCH, SIZE = 32, 128


def conv_inputs(n_layers: int, batches: int) -> tuple:
    """(names, inputs[layer] = [x (B, C, H, W) per batch]) of the last n convs."""
    model = zoo.build_from_name(f"{WEIGHTS}.json", 2, f"{WEIGHTS}.npz")
    model.eval()
    data = np.load(SHARED / "data" / "hymenoptera_train.npz")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    convs = convs[-n_layers:]
    inputs = {name: [] for name, _ in convs}
    for name, conv in convs:
        conv.register_forward_hook(lambda m, args, out, name=name: inputs[name].append(
            args[0].detach().numpy().copy()))
    order = np.random.default_rng(0).permutation(len(data["labels"]))
    with torch.no_grad():
        for b in range(batches):
            model(zoo.preprocess(data["images"][order[b * BATCH:(b + 1) * BATCH]], model.spec,
                                 SIZE))
    return [name for name, _ in convs], inputs


def error(x: np.ndarray, core: np.ndarray, factors) -> float:
    rebuilt = core.astype(np.float64)
    for mode, u in enumerate(factors):
        rebuilt = mode_product(rebuilt, np.asarray(u, np.float64), mode)
    return float(np.linalg.norm(rebuilt - x) / np.linalg.norm(x))


def layer_errors(xs: list, eps: float) -> dict:
    asi = Asi(eps=eps)
    ranks = asi(xs[0]).rank_per_mode
    lagged = [np.asarray(u, np.float64) for u in asi.factors]
    errors = {"exact": [], "asi": [], "lagged": []}
    for x in xs[1:]:
        x64 = x.astype(np.float64)
        best = hosvd(x64, ranks=ranks)
        errors["exact"].append(error(x64, best.core, best.factors))
        kept = asi(x).pieces
        errors["asi"].append(error(x64, kept["core"], [kept[p] for p in (
            "u_batch", "u_channel", "u_height", "u_width")]))
        p = x64
        for n in (1, 2, 3):
            p = mode_product(p, lagged[n - 1].T, n)
        rows = p.reshape(len(x), -1)
        u1 = np.linalg.svd(rows, full_matrices=False)[0][:, :ranks[0]]
        core = (u1.T @ rows).reshape((u1.shape[1],) + p.shape[1:])
        errors["lagged"].append(error(x64, core, [u1] + lagged))
        lagged = [np.linalg.qr(unfold(x64, n) @ (unfold(x64, n).T @ lagged[n - 1]))[0]
                  for n in (1, 2, 3)]
    return {"ranks": list(ranks), **{k: float(np.median(v)) for k, v in errors.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--batches", type=int, default=7)
    args = parser.parse_args()
    names, inputs = conv_inputs(args.layers, args.batches)
    rows = []
    for name in names:
        rows.append({"layer": name, **layer_errors(inputs[name], args.eps)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": str(date.today()), "eps": args.eps, "layers": args.layers,
            "batches": args.batches, "batch": BATCH, "input_size": SIZE,
            "command": f".venv/bin/python benchmarks/asi_fidelity.py --layers {args.layers}"}
    lines = ["# asi's reconstruction error on real conv inputs (mcunet-5fps, ants/bees)", "",
             f"{meta['date']}; eps {args.eps} ranks fixed on the first batch, medians over the "
             f"{args.batches - 1} later batches of {BATCH} at {SIZE} px.", "", f"Command: `{meta['command']}`", "",
             "| layer | ranks | exact HOSVD | asi | lagged |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {tuple(r['ranks'])} | {r['exact']:.4f} | "
                     f"{r['asi']:.4f} | {r['lagged']:.4f} |")
    write_results("asi_fidelity", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
