"""`actcomp`: the host command line (workstation side)."""
from __future__ import annotations

import argparse
import json
import sys

from export.cli import add_export_parser

from .. import __version__
from ..core.arch import ZOO, load_spec
from ..core.cliutil import (Parser, add_rank_arguments, input_size, non_negative_float,
                            positive_float, positive_int, refuse_unused_rank_flags, size_bytes)
from ..core.memory import mib, plan, plan_table
from ..core.methods import METHODS, RANKED
from ..core.profiles import OPTIMIZER_STATE, Fit, load_profile, profile_names, \
    trainable_param_count
from ..core.program import network
from ..core.schedules import DEFAULT_SCHEDULE, SCHEDULES

# The paper's analytic columns (batch 64, 224x224, float32, MiB): vanilla and
# Gradient Filter R2 for the last N = 2 and 4 convs.
PAPER_TABLE = {
    "mobilenet_v2": {"vanilla": ("15.31", "28.71"), "gf-r2": ("5.00", "9.38")},
    "resnet18": {"vanilla": ("12.25", "30.63"), "gf-r2": ("4.00", "7.00")},
    "resnet34": {"vanilla": ("12.25", "24.50"), "gf-r2": ("4.00", "8.00")},
    "mcunet-in1": {"vanilla": ("13.78", "19.52"), "gf-r2": ("4.50", "6.38")},
}


def add_profile_arguments(parser, required: bool = False) -> None:
    parser.add_argument("--profile", required=required,
                        help="device profile: a .toml file or a shipped name ("
                             + ", ".join(profile_names()) + ")")
    parser.add_argument("--budget", type=size_bytes,
                        help="training budget overriding the profile's, e.g. 48MiB, 512MB")


def model_network(args) -> tuple:
    """(network, input size, layers -> trainable parameter count) of --model: a zoo name, a
    spec .json, or FILE.py:FUNCTION (traced by the exporter's torch frontend, at
    --input-size or 224)."""
    if ".py:" in args.model:
        from export.module_export import load_model_file  # torch: only for a model file
        from export.torch_frontend import program_from_module
        from ..core.profiles import program_param_count
        from ..core.program import network_of
        size = args.input_size or (224, 224)
        program, _ = program_from_module(load_model_file(args.model), size)
        return network_of(program), size, lambda n: program_param_count(program, n)
    spec = load_spec(args.model, args.num_classes)
    size = args.input_size or input_size(str(spec.get("input", {}).get("resolution", 224)))
    net = network(spec, size)
    return net, size, lambda n: trainable_param_count(spec, net.convs, n)


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict the memory kept for backward",
                       description="Predict the bytes kept for the backward pass when the last N "
                                   "convs (and the classifier) of a model are fine-tuned.")
    p.add_argument("--model", required=True,
                   help=f"zoo name ({', '.join(sorted(ZOO))}), an architecture spec .json, or "
                        f"FILE.py:FUNCTION where FUNCTION() returns your torch.nn.Module")
    p.add_argument("--layers", type=positive_int,
                   help="fine-tune the last N Conv2d modules (definition order); required "
                        "unless --profile is given, which then searches the largest N that fits")
    p.add_argument("--method", choices=list(METHODS), required=True,
                   help="how the conv inputs are kept: vanilla, svd (mode-1), hosvd, gf-r2 "
                        "(Gradient Filter, r=2)")
    add_rank_arguments(p, "; plan sizes are a worst-case bound since eps ranks depend on the "
                          "data (with --ranks they are exact)")
    p.add_argument("--batch-size", type=positive_int,
                   help="batch size (default 64; with --profile and no --batch-size, the "
                        "largest power of two up to 256 that fits is searched)")
    p.add_argument("--input-size", type=input_size,
                   help="input resolution, 224 or HxW (default: the model's own)")
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs (default 1000)")
    add_profile_arguments(p)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE), default="sgd",
                   help="with --profile: optimizer whose state is counted (sgd: momentum, 1x "
                        "the weights; adamw: 2x; default sgd)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan, parser=p)


def cmd_plan(args) -> int:
    refuse_unused_rank_flags(args, RANKED)
    if args.profile is not None:
        return cmd_plan_profile(args)
    if args.layers is None:
        args.parser.error("the following arguments are required: --layers (or give --profile "
                          "to search for the largest that fits)")
    if args.batch_size is None:
        args.batch_size = 64
    net, size, _ = model_network(args)
    result = plan(net, args.layers, args.method, args.batch_size, size, eps=args.eps,
                  ranks=args.ranks, rank_cap=args.rank_cap)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(plan_table(result, args.layers))
    return 0


BATCH_CANDIDATES = tuple(2 ** i for i in range(9))  # 1 .. 256
NOT_COUNTED = ("not counted: the transient forward/backward workspace (the frozen prefix's "
               "activations, a conv input before it is compressed); `actcomp-device train "
               "--budget` measures it with a dry-run step")


def cmd_plan_profile(args) -> int:
    """plan against a device profile; searches --layers and/or --batch-size when omitted:
    the largest value that fits (full accounting; eps: worst-case ranks, --ranks: exact)."""
    profile = load_profile(args.profile)
    net, size, param_count = model_network(args)

    def evaluate(n_layers, batch):
        result = plan(net, n_layers, args.method, batch, size, eps=args.eps, ranks=args.ranks,
                      rank_cap=args.rank_cap)
        params = param_count(n_layers)
        return result, Fit.from_params(result.full_bytes, params, args.optimizer, profile,
                                       args.budget)

    def largest(n_layers=None, batch=None):
        """(layers, batch, plan, fit, found): the largest value of the omitted axis that fits,
        else its smallest (to show by how much it does not)."""
        tried = [(n, batch) for n in range(1, len(net.convs) + 1)] if n_layers is None else \
                [(n_layers, b) for b in BATCH_CANDIDATES]
        tried = [(n, b) + evaluate(n, b) for n, b in tried]
        fitting = [t for t in tried if t[3].fits]
        return fitting[-1] + (True,) if fitting else tried[0] + (False,)

    def proposal(n, b, fit):
        return {"layers": n, "batch_size": b, "working_bytes": fit.working_bytes,
                "margin_bytes": fit.margin_bytes}

    search = [a for a, v in (("layers", args.layers), ("batch_size", args.batch_size)) if v is None]
    head = (f"device {profile.name} ({profile.path}): {mib(profile.ram_bytes)} MiB RAM, "
            f"{profile.cores} cores, training budget {mib(args.budget or profile.budget_bytes)} MiB")
    if len(search) == 2:  # the largest --layers for every batch size
        rows = [largest(batch=b) for b in BATCH_CANDIDATES]
        proposals = [proposal(n, b, fit) for n, b, _, fit, found in rows if found]
        if args.json:
            print(json.dumps({"model": net.name, "method": args.method, "eps": args.eps,
                              "optimizer": args.optimizer, "profile": profile.to_json(),
                              "budget_bytes": args.budget or profile.budget_bytes,
                              "search": search, "proposals": proposals}))
            return 0
        print(head)
        print(f"largest --layers that fits each --batch-size ({net.name}, {args.method}"
              + (f" eps {args.eps}, worst-case ranks" if args.eps is not None else "")
              + f", {args.optimizer}, input {size[0]}x{size[1]}):")
        print(f"{'batch':>6} {'layers':>7} {'working MiB':>12} {'margin MiB':>11}")
        for n, b, _, fit, found in rows:
            print(f"{b:>6} {n if found else '-':>7} {mib(fit.working_bytes):>12} "
                  f"{mib(fit.margin_bytes):>11}" + ("" if found else "  (--layers 1 does not fit)"))
        print(NOT_COUNTED)
        return 0

    if search:
        args.layers, args.batch_size, result, fit, found = largest(args.layers, args.batch_size)
        flag, value = (("--layers", args.layers) if search == ["layers"]
                       else ("--batch-size", args.batch_size))
        message = (f"proposal: {flag} {value} (the largest that fits)" if found else
                   f"no {flag} fits: even {flag} {value} needs {mib(fit.working_bytes)} MiB")
    else:
        result, fit = evaluate(args.layers, args.batch_size)
    if args.json:
        out = dict(result.to_json(), profile=profile.to_json(), fit=fit.to_json())
        if search:
            out.update(search=search, proposals=[proposal(args.layers, args.batch_size, fit)]
                       if found else [])
        print(json.dumps(out))
        return 0
    print(head)
    if search:
        print(message)
    print(plan_table(result, args.layers))
    print()
    print("\n".join(fit.lines() + [NOT_COUNTED]))
    return 0


def add_check(sub) -> None:
    c = sub.add_parser("check", help="does an exported artifact fit a device?",
                       description="Compare an artifact's predicted training memory (activations "
                                   "kept for backward, full accounting, from manifest.json; "
                                   "weights.npz; gradients of the same size; optimizer.npz) with "
                                   "a device profile's training budget. Exit 0 if it fits, 1 if "
                                   "not, 2 for bad input.")
    c.add_argument("artifact", help="training artifact folder (from `actcomp export`)")
    add_profile_arguments(c, required=True)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    """Does an exported artifact fit a device profile? exit 0 yes, 1 no, 2 bad input."""
    from pathlib import Path

    from ..core.manifest import load_manifest
    from ..core.npz import load_npz
    profile = load_profile(args.profile)
    folder = Path(args.artifact)
    if not folder.is_dir() and (".py:" in args.artifact or folder.suffix in (".py", ".json")
                                or args.artifact in ZOO):
        raise ValueError(f"{args.artifact} is a model, not an artifact: `actcomp plan --model "
                         f"{args.artifact} --profile {args.profile}` checks it before export "
                         f"(the largest --layers and --batch-size that fit), `actcomp check ART` "
                         f"an exported artifact")
    m = load_manifest(folder)
    memory, train, plan = m.predicted_memory, m.train, m.memory_plan
    activations, optimizer = memory.full_bytes, train.optimizer
    n_layers, batch = len(m.trainable_layers), memory.batch_size
    weights = sum(a.nbytes for a in load_npz(folder / "weights.npz").values())
    state = sum(a.nbytes for a in load_npz(folder / "optimizer.npz").values())
    fit = Fit(activations, weights, weights, state, optimizer, args.budget or profile.budget_bytes,
              profile.runtime_baseline_bytes, profile.ram_bytes)
    budget = args.budget or profile.budget_bytes
    # the plan predicts the whole working set (transients included); at bound eps ranks the
    # Fit's worst case decides (the dry run of `actcomp-device train --budget` measures)
    fits = plan.working_set_bytes <= budget if plan.rank_basis != "bound" else fit.fits
    if args.json:
        print(json.dumps({"artifact": str(folder), "model": m.model,
                          "profile": profile.to_json(), "fit": fit.to_json(),
                          "memory_plan": plan.to_json(), "fits": fits}))
        return 0 if fits else 1
    size = memory.input_size
    print(f"artifact {folder}: {m.model}, last {n_layers} convs + classifier, method "
          f"{train.method}" + (f" eps {train.eps}" if train.eps is not None else "")
          + f", batch {batch}, input {size[0]}x{size[1]}, {optimizer}"
          + (" (activations: worst-case eps ranks)" if memory.rank_basis == "bound" else ""))
    print(f"device {profile.name} ({profile.path}): {mib(profile.ram_bytes)} MiB RAM, "
          f"{profile.cores} cores")
    print("\n".join(fit.lines()))
    verdict = "fits" if plan.working_set_bytes <= budget else "does NOT fit"
    print(f"{'memory plan: working set':<40} {mib(plan.working_set_bytes):>10} MiB of the "
          f"{mib(budget)} MiB budget: {verdict} (pool {mib(plan.pool_bytes)}, arena "
          f"{mib(plan.arena_bytes)}, numpy {mib(plan.numpy_peak_bytes)} MiB; peak at "
          f"{plan.peak_at}; {plan.rank_basis} ranks"
          + "; a prediction: the dry run of `actcomp-device train --budget` measures a step)")
    return 0 if fits else 1


def add_report(sub) -> None:
    r = sub.add_parser("report", help="plots and a summary page from profile streams",
                       description="Read profile streams (JSON lines, e.g. from `actcomp-device "
                                   "train --report file://RUN.jsonl`) and write PNG plots (memory, "
                                   "kept activations, ranks, loss; several runs on the same axes, "
                                   "named by file stem) and index.md / index.html with a summary "
                                   "table per run. Malformed lines are skipped and counted.")
    r.add_argument("streams", nargs="+", metavar="RUN.jsonl", help="profile stream(s)")
    r.add_argument("-o", "--out", required=True, help="report folder (created)")
    r.add_argument("--budget", type=size_bytes,
                   help="working-set budget drawn in memory.png for runs trained without one")
    r.add_argument("--profile", help="device profile (name in profiles/ or .toml): its budget")
    r.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    try:
        from .report import build_report
    except ImportError as e:
        raise ValueError(f"report needs matplotlib ({e}): pip install 'actcomp-edge[host]'") \
            from None
    try:
        budget = args.budget
        if budget is None and args.profile:
            budget = load_profile(args.profile).budget_bytes
        result = build_report(args.streams, args.out, budget)
    except OSError as e:
        raise ValueError(f"{e.filename or args.out}: {e.strerror or e}") from None
    for s in result["summaries"]:
        loss = "-" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
        print(f"{s['run']}: " + (f"{s['rounds']} fleet rounds, central val accuracy "
                                 f"{s['val_accuracy']:.4f}" if s["rounds"] else
                                 f"{s['steps'] or 0} steps, final loss {loss}")
              + (f", {s['skipped_lines']} malformed lines skipped" if s["skipped_lines"] else ""))
    print(f"report: {args.out}/index.md (and index.html, "
          + ", ".join(f"{n}.png" for n in result["plots"]) + ")")
    return 0


def add_monitor(sub) -> None:
    mo = sub.add_parser("monitor", help="receive a runner's profile stream live",
                        description="Receive, acknowledge, show and store a runner's memory "
                                    "profile stream; flag budget violations (exit 1 if any).")
    mo.add_argument("url", help="serial port or pyserial URL (/dev/ttyACM0, loop://), "
                                "tcp://HOST:PORT to listen (the runner uses socket://HOST:PORT), "
                                "or file://PATH.jsonl to follow a file the runner writes")
    mo.add_argument("--profile", help="device profile (name in profiles/ or .toml): its budget")
    mo.add_argument("--budget", type=size_bytes,
                    help="budget for the working set, e.g. 48MiB (overrides the "
                                     "profile's; default: what the runner reports)")
    mo.add_argument("-o", "--output", help="append the records here as JSON lines (a restart "
                                           "continues after the last saved record)")
    mo.add_argument("--idle-timeout", type=float, default=600.0,
                    help="stop after this many seconds without data (default 600)")
    mo.set_defaults(func=cmd_monitor)


def cmd_monitor(args) -> int:
    from .monitor import monitor
    budget = args.budget
    if budget is None and args.profile:
        budget = load_profile(args.profile).budget_bytes
    return monitor(args.url, args.output, budget, args.idle_timeout)


def add_fleet(sub) -> None:
    f = sub.add_parser("fleet", help="federated fine-tuning of one artifact on Flower",
                       description="Many boards fine-tune one artifact together on Flower's "
                                   "deployment runtime; only the trainable weights travel.")
    fleet_sub = f.add_subparsers(dest="fleet_command", required=True, parser_class=Parser)
    fl = fleet_sub.add_parser("local", help="a whole fleet on this machine (127.0.0.1)",
                              description="Shard --data over --nodes, start a SuperLink and a "
                                          "SuperNode per node on 127.0.0.1, run the rounds, "
                                          "stop every process, write the summary.")
    fl.add_argument("--data", required=True, help="images to shard over the nodes")
    fl.add_argument("--nodes", type=positive_int, default=2, help="nodes (default 2)")
    fl.add_argument("--partition", default="iid",
                    help="iid or dirichlet:ALPHA (non-IID labels; default iid)")
    fl.add_argument("--profile", help="device profile of the nodes: a name or .toml, or a "
                                      "comma list cycled over the nodes (default: no budget)")
    fl.add_argument("--batch-size", type=positive_int, help="the nodes' batch (default: the "
                                                            "artifact's)")
    add_fleet_arguments(fl)
    fr = fleet_sub.add_parser("run", help="run the rounds on a SuperLink real boards joined",
                              description="Run the fleet app on a running `flower-superlink`; "
                                          "each board runs `flower-supernode` (README: Fleet).")
    fr.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    fr.add_argument("--min-nodes", type=positive_int, default=2,
                    help="nodes that must be connected before each round (default 2)")
    add_fleet_arguments(fr)


def cmd_fleet(args) -> int:
    import signal
    from . import fleet  # processes and files only: flwr runs in the processes it starts

    def stop(signum, frame):  # SIGTERM / SIGHUP unwind like Ctrl-C: the processes are stopped
        raise KeyboardInterrupt
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        return fleet.run_local(args) if args.fleet_command == "local" else fleet.run_remote(args)
    except RuntimeError as e:  # a Flower process failed
        print(f"actcomp: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a full disk while writing the shards or the summary
        print(f"actcomp: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("actcomp: interrupted: " + (
            "every fleet process was stopped" if args.fleet_command == "local" else
            "the run goes on on the SuperLink (`flwr ls`, `flwr stop RUN_ID`)"),
              file=sys.stderr)
        return 130


def add_fleet_arguments(parser) -> None:
    parser.add_argument("artifact", help="training artifact folder (from `actcomp export`)")
    parser.add_argument("--val-data", required=True,
                        help="central evaluation images after each round (.npz or ImageFolder)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds (default 3)")
    parser.add_argument("--local-epochs", type=positive_int, default=1,
                        help="epochs each node trains per round (default 1)")
    parser.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam"), default="fedavg",
                        help="Flower's strategy (default fedavg, weighted by examples)")
    parser.add_argument("--proximal-mu", type=non_negative_float, default=0.0,
                        help="FedProx's mu (with --strategy fedprox)")
    parser.add_argument("--server-lr", type=positive_float, default=0.01,
                        help="FedAdam's server learning rate eta (default 0.01)")
    parser.add_argument("--lr", type=positive_float,
                        help="the nodes' peak learning rate (default: the runner's recipe)")
    parser.add_argument("--schedule", default="",
                        help=f"the nodes' lr schedule, once over all the rounds: "
                             f"{', '.join(SCHEDULES)} (default {DEFAULT_SCHEDULE})")
    parser.add_argument("--seed", type=int, default=0, help="shards and data order (default 0)")
    parser.add_argument("--threads", type=positive_int,
                        help="threads of each node and of the central evaluation (default: "
                             "this machine's cores / nodes)")
    parser.add_argument("--round-timeout", type=positive_float, default=3600.0,
                        help="seconds a round waits for the nodes' replies (default 3600)")
    parser.add_argument("--out", help="the run's folder, new or empty (default "
                                      "ARTIFACT/fleet/<time>)")
    parser.add_argument("--summary", help="summary JSON (default OUT/summary.json)")
    parser.set_defaults(func=cmd_fleet)


def add_paper_table(sub) -> None:
    t = sub.add_parser("paper-table", help="recompute the paper's analytic memory columns",
                       description="Vanilla and Gradient Filter R2 memory of the paper's models "
                                   "(batch 64, 224x224), next to the figures the paper prints.")
    t.set_defaults(func=cmd_paper_table)


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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="actcomp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"actcomp-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_plan(sub)

    add_export_parser(sub)

    add_monitor(sub)
    add_paper_table(sub)
    add_check(sub)
    add_fleet(sub)
    add_report(sub)
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
    except BrokenPipeError:  # `actcomp ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
