"""`actcomp`: the host command line (workstation side)."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .arch import ZOO, load_spec, network
from .memory import METHODS, RANK_BASES, mib, plan

# The paper's analytic columns (batch 64, 224x224, float32, MiB): vanilla and
# Gradient Filter R2 for the last N = 2 and 4 convs.
PAPER_TABLE = {
    "mobilenet_v2": {"vanilla": ("15.31", "28.71"), "gf-r2": ("5.00", "9.38")},
    "resnet18": {"vanilla": ("12.25", "30.63"), "gf-r2": ("4.00", "7.00")},
    "resnet34": {"vanilla": ("12.25", "24.50"), "gf-r2": ("4.00", "8.00")},
    "mcunet-in1": {"vanilla": ("13.78", "19.52"), "gf-r2": ("4.50", "6.38")},
}


def input_size(text: str) -> tuple:
    """'224' or '224x160' (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must look like 224 or 224x160, got {text!r}")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"input size must look like 224 or 224x160, got {text!r}")
    return tuple(parts)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def eps_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"eps must be in (0, 1], got {text!r}")
    return value


def cmd_plan(args) -> int:
    spec = load_spec(args.model, args.num_classes)
    size = args.input_size or input_size(str(spec.get("input", {}).get("resolution", 224)))
    net = network(spec, size)
    result = plan(net, args.layers, args.method, args.batch_size, size, eps=args.eps,
                  ranks=args.ranks, rank_cap=args.rank_cap)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print_plan(result, args.layers)
    return 0


def print_plan(result, n_layers: int) -> None:
    """The per-layer memory table of a Plan."""
    size = result.input_size
    print(f"{result.model}: last {n_layers} convs + classifier, method {result.method}"
          + (f", eps {result.eps}" if result.eps is not None else "")
          + f", batch {result.batch_size}, input {size[0]}x{size[1]}, float32")
    print(f"ranks: {RANK_BASES[result.rank_basis]}")
    header = f"{'layer':<24} {'input (B,C,H,W)':<22} {'ranks':<18} {'paper MiB':>10} {'full MiB':>10}"
    print(header)
    print("-" * len(header))
    for layer in result.layers:
        ranks = ",".join(map(str, layer.rank_per_mode)) if layer.rank_per_mode else "-"
        print(f"{layer.name:<24} {str(tuple(layer.input_shape)):<22} {ranks:<18} "
              f"{mib(layer.paper_bytes):>10} {mib(layer.full_bytes):>10}")
    print("-" * len(header))
    print(f"{'total':<66} {mib(result.paper_bytes):>10} {mib(result.full_bytes):>10}")
    print("paper = conv inputs only (the paper's tables); full = also activation masks and the "
          "classifier input (what a budget must hold)")


def cmd_export(args) -> int:
    from export.cli import run_export  # torch + onnx: only needed here
    return run_export(args)


def cmd_paper_table(args) -> int:
    """The paper's analytic memory columns, recomputed next to the printed figures."""
    print("batch 64, 224x224, float32, MiB; computed (paper)")
    print(f"{'model':<14} {'vanilla N=2':>16} {'vanilla N=4':>16} {'GF-R2 N=2':>16} {'GF-R2 N=4':>16}")
    mismatches = 0
    for model, printed in PAPER_TABLE.items():
        net = network(load_spec(model), 224)
        cells = []
        for method in ("vanilla", "gf-r2"):
            for i, n in enumerate((2, 4)):
                ours = mib(plan(net, n, method, 64, 224).paper_bytes)
                mismatches += ours != printed[method][i]
                cells.append(f"{ours} ({printed[method][i]})")
        print(f"{model:<14} " + " ".join(f"{c:>16}" for c in cells))
    print("all figures match the paper" if not mismatches else f"{mismatches} figures differ")
    return 1 if mismatches else 0


def add_rank_arguments(parser, eps_note: str) -> None:
    """--eps | --ranks, and --rank-cap (hosvd, hosvd-tracked, svd)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--eps", type=eps_value,
                       help="explained-variance threshold in (0,1] for hosvd/svd ranks" + eps_note)
    group.add_argument("--ranks", type=positive_int, nargs="+",
                       help="fixed ranks: 4 for hosvd (B C H W), 1 for svd")
    parser.add_argument("--rank-cap", type=positive_int, nargs="+",
                        help="upper bound on the ranks (hosvd: 1 value for all modes or 4; svd: 1)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="actcomp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"actcomp-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("plan", help="predict the memory kept for backward",
                       description="Predict the bytes kept for the backward pass when the last N "
                                   "convs (and the classifier) of a model are fine-tuned.")
    p.add_argument("--model", required=True,
                   help=f"zoo name ({', '.join(sorted(ZOO))}) or an architecture spec .json")
    p.add_argument("--layers", type=positive_int, required=True,
                   help="fine-tune the last N Conv2d modules (definition order)")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="how the conv inputs are kept: vanilla, svd (mode-1), hosvd, gf-r2 "
                        "(Gradient Filter, r=2)")
    add_rank_arguments(p, "; plan sizes are a worst-case bound since eps ranks depend on the "
                          "data (with --ranks they are exact)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--input-size", type=input_size,
                   help="input resolution, 224 or HxW (default: the model's own)")
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs (default 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    e = sub.add_parser("export", help="build a training artifact for the device",
                       description="Turn a model (zoo name or spec .json) with optional .npz "
                                   "weights into a training artifact folder: ONNX training-step "
                                   "graphs whose fine-tuned convs keep only compressed "
                                   "activations, weights, optimizer state and manifest.json.")
    e.add_argument("--model", required=True,
                   help=f"zoo name ({', '.join(sorted(ZOO))}) or an architecture spec .json "
                        "(the format of ../shared/weights/*.json)")
    e.add_argument("--weights", help=".npz whose array names match the model (no pickles); "
                                     "without it the model is randomly initialised (--seed)")
    e.add_argument("--num-classes", type=positive_int,
                   help="classifier outputs; when it differs from the weights' classifier, the "
                        "classifier is re-initialised (default: the weights' / 1000)")
    e.add_argument("--classes", help="text file with one class name per line (optional)")
    e.add_argument("--layers", type=positive_int, required=True,
                   help="fine-tune the last N Conv2d modules and the classifier")
    e.add_argument("--method", choices=METHODS, default="hosvd",
                   help="what the backward keeps of each fine-tuned conv input (default hosvd): "
                        "vanilla (all of it), hosvd (the paper: eps ranks recomputed every "
                        "step), hosvd-tracked (ranks fixed between refreshes, factors followed "
                        "by a cheap subspace iteration), svd (mode-1), gf-r2 (Gradient Filter)")
    e.add_argument("--refresh-every", type=positive_int, default=50,
                   help="hosvd-tracked: run the exact HOSVD (and re-pick eps ranks) every K "
                        "steps (default 50)")
    add_rank_arguments(e, "; ranks are recomputed every step (the paper's rule)")
    e.add_argument("--batch-size", type=positive_int, default=32,
                   help="training batch size the memory prediction is made for (default 32; the "
                        "graphs accept any batch)")
    e.add_argument("--input-size", type=input_size,
                   help="training resolution, 128 or HxW (default: the model's own)")
    e.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="update rule baked into the backward graph (default sgd)")
    e.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    e.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay (SGD: L2 added to the gradient; AdamW: decoupled)")
    e.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing in [0, 1) (default 0)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    e.add_argument("-o", "--out", required=True, help="artifact folder to create")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("paper-table", help="recompute the paper's analytic memory columns",
                       description="Vanilla and Gradient Filter R2 memory of the paper's models "
                                   "(batch 64, 224x224), next to the figures the paper prints.")
    t.set_defaults(func=cmd_paper_table)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rank_cap", None) is not None:
        args.rank_cap = args.rank_cap[0] if len(args.rank_cap) == 1 else tuple(args.rank_cap)
    try:
        return args.func(args)
    except ValueError as e:  # SpecError, bad layer counts, ranks, ...
        print(f"actcomp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
