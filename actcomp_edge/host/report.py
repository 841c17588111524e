"""`actcomp report`: plots and a one-page summary of profile streams (JSON lines).

A stream is what `actcomp-device train --report file://RUN.jsonl` writes (or a host
receiver saves): one JSON object per line. Used here:

- ``{"type": "step", ...}``: a step's profile (`actcomp_edge.core.record.StepRecord`)
- ``{"type": "epoch", "epoch", "step", "val_accuracy"}``
- ``{"type": "summary", ...}`` (the runner's --summary), ``{"type": "spool_overflow", ...}``
- ``{"type": "round", "round", "val_accuracy", "loss", "bytes_sent", "nodes": [{"node",
  "peak_rss_bytes", "working_set_bytes", ...}]}``: a fleet's journal (`actcomp fleet`,
  OUT/server/fleet.jsonl), plotted in fleet.png

Other types are ignored; lines that are not such JSON objects (a torn last line, garbage)
are skipped and counted. A step seen twice (a resumed run re-sends it) keeps its last record.

Each plot function draws several runs on the same axes (legend by run name: the file stem)
and returns what it drew, ``{line label: (x list, y list)}``, in the plotted units.
matplotlib is used through the Agg canvas only (no GUI, no pyplot state).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..core.methods import METHODS
from ..core.record import StepRecord

MIB = 2 ** 20
KIB = 2 ** 10
MODES = ("mode 1 (batch)", "mode 2 (channel)", "mode 3 (height)", "mode 4 (width)")
STYLES = ("-", "--", ":", "-.")
FIGURES = ("memory", "kept", "ranks", "loss")
# a fleet round's node fields the plots and the summary need (all ints)
NODE_FIELDS = ("peak_rss_bytes", "working_set_bytes", "baseline_rss_bytes")


@dataclass
class Run:
    name: str
    path: str
    steps: list = field(default_factory=list)      # StepRecords, by step number
    epochs: list = field(default_factory=list)
    summary: dict = None
    rounds: list = field(default_factory=list)      # a fleet journal's round records
    overflows: int = 0                              # spool_overflow records
    skipped: int = 0                                # malformed lines
    ignored: int = 0                                # records of other types


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def valid_round(rec: dict) -> bool:
    nodes = rec.get("nodes")
    return (_is(rec.get("round"), int) and _is(rec.get("val_accuracy"), (int, float))
            and isinstance(nodes, list) and all(
                isinstance(n, dict) and isinstance(n.get("node"), str)
                and all(_is(n.get(k), int) for k in NODE_FIELDS) for n in nodes))


def read_run(path, name: str = None) -> Run:
    """The records of one stream; OSError if it cannot be read."""
    path = Path(path)
    run = Run(name or path.stem, str(path))
    steps = {}
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                run.skipped += 1
                continue
            kind = rec.get("type") if isinstance(rec, dict) else None
            if not isinstance(kind, str):
                run.skipped += 1
            elif kind == "step":
                try:
                    step = StepRecord.from_json(rec)
                except ValueError:
                    run.skipped += 1
                else:
                    steps[step.step] = step
            elif kind == "epoch":
                if _is(rec.get("step"), int) and _is(rec.get("val_accuracy"), (int, float)):
                    run.epochs.append(rec)
                else:
                    run.skipped += 1
            elif kind == "round":
                if valid_round(rec):
                    run.rounds.append(rec)
                else:
                    run.skipped += 1
            elif kind == "summary":
                run.summary = rec
            elif kind == "spool_overflow":
                run.overflows += 1
            else:
                run.ignored += 1
    run.steps = [steps[k] for k in sorted(steps)]
    return run


def read_runs(paths) -> list:
    """Runs named by file stem; a repeated stem gets its parent folder's name in front."""
    stems = [Path(p).stem for p in paths]
    return [read_run(p, f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s)
            for p, s in zip(paths, stems)]


# ---------------------------------------------------------------- plots

def _figure(cols: int, title: str, rows: int = 1):
    fig = Figure(figsize=(6.4 * cols, 4.8 * rows), dpi=100, layout="constrained")
    fig.suptitle(title)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")


def series_style(j: int) -> dict:
    """The look of series j of a plot (a layer): colour and marker (next series differ in
    both; the first 80 in the pair, then the line style), so that series with equal values
    stay apart: the hollow markers of the lower one show through."""
    return {"color": f"C{j % 10}", "marker": MARKERS[(j + j // 10) % len(MARKERS)],
            "linestyle": STYLES[(j // 80) % len(STYLES)], "fillstyle": "none"}


def _line(ax, drawn: dict, label: str, x, y, **style) -> None:
    x, y = list(x), list(y)
    if not x:
        return
    style.setdefault("marker", ".")
    style.setdefault("markevery", max(1, len(x) // 20))  # about 20 markers a line
    ax.plot(x, y, label=label, **style)
    drawn[label] = (x, y)


def _finish(fig, axes, path, xlabel="step", empty="no data") -> None:
    """Axis labels, grid, and each legend outside its axes (on the right: never over data)."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path)


def plot_memory(runs, path, budget: int | None = None) -> dict:
    """RSS and peak RSS (MiB): absolute with baseline + budget, and minus the baseline with
    the budget (what `--budget` bounds: the peak RSS growth over the baseline) and the memory
    plan's predicted working set. ``budget`` (bytes): drawn for the runs whose records have
    none (a run without --budget, checked against a device profile's)."""
    fig, (absolute, relative) = _figure(2, "process memory")
    drawn = {}
    for i, run in enumerate(runs):
        x = [r.step for r in run.steps]
        color = f"C{i % 10}"
        for label, key, style in (("RSS", "rss_bytes", ":"), ("peak RSS", "peak_rss_bytes", "-")):
            _line(absolute, drawn, f"{run.name} {label}", x,
                  [getattr(r, key) / MIB for r in run.steps], color=color, linestyle=style)
            _line(relative, drawn, f"{run.name} {label} - baseline", x,
                  [(getattr(r, key) - r.baseline_rss_bytes) / MIB for r in run.steps],
                  color=color, linestyle=style)
        planned = [r for r in run.steps if r.predicted_working_set_bytes is not None]
        if planned:
            _line(relative, drawn, f"{run.name} predicted working set (memory plan)",
                  [r.step for r in planned],
                  [r.predicted_working_set_bytes / MIB for r in planned], color=color,
                  linestyle="-.", marker="")
        budgeted = [(r.step, r.budget_bytes, r.baseline_rss_bytes) for r in run.steps
                    if r.budget_bytes is not None]
        name = f"{run.name} budget"
        if not budgeted and budget is not None:
            budgeted = [(r.step, budget, r.baseline_rss_bytes) for r in run.steps]
            name = f"{run.name} budget (given to the report)"
        if budgeted:
            bx = [step for step, _, _ in budgeted]
            _line(absolute, drawn, f"{run.name} baseline + budget", bx,
                  [(base + b) / MIB for _, b, base in budgeted], color=color, linestyle="--",
                  marker="")
            _line(relative, drawn, name, bx, [b / MIB for _, b, _ in budgeted], color=color,
                  linestyle="--", marker="")
    absolute.set(title="absolute", ylabel="MiB")
    relative.set(title="minus the baseline (before the first step)", ylabel="MiB")
    _finish(fig, (absolute, relative), path)
    return drawn


def plot_kept(runs, path) -> dict:
    """Activation bytes kept for backward (KiB, log scale): per layer, and the totals."""
    fig, (per_layer, totals) = _figure(2, "activations kept for backward")
    drawn = {}
    for i, run in enumerate(runs):
        x = [r.step for r in run.steps]
        style = STYLES[i % len(STYLES)]
        layers = list(dict.fromkeys(k for r in run.steps for k in r.kept_bytes))
        for j, layer in enumerate(layers):
            pts = [(r.step, r.kept_bytes[layer] / KIB) for r in run.steps
                   if layer in r.kept_bytes]
            _line(per_layer, drawn, f"{run.name}: {layer}", *zip(*pts),
                  **dict(series_style(j), linestyle=style))
        color = f"C{i % 10}"
        _line(totals, drawn, f"{run.name} conv inputs (paper)", x,
              [r.kept_bytes_total / KIB for r in run.steps], color=color, linestyle="-")
        _line(totals, drawn, f"{run.name} full (with masks, classifier input)", x,
              [r.kept_full_bytes / KIB for r in run.steps], color=color, linestyle="--")
    for ax, title in ((per_layer, "per fine-tuned conv"), (totals, "total")):
        ax.set(title=title, ylabel="KiB")
        if ax.get_lines():
            ax.set_yscale("log")
    _finish(fig, (per_layer, totals), path)
    return drawn


def plot_ranks(runs, path) -> dict:
    """Ranks per mode over steps (HOSVD: K1..K4; SVD: its one rank in mode 1)."""
    fig, axes = _figure(2, "ranks kept per mode", rows=2)
    drawn = {}
    for i, run in enumerate(runs):
        style = STYLES[i % len(STYLES)]
        layers = list(dict.fromkeys(k for r in run.steps for k in r.ranks))
        for j, layer in enumerate(layers):
            pts = [(r.step, r.ranks[layer]) for r in run.steps if r.ranks.get(layer)]
            for mode, ax in enumerate(axes):
                mode_pts = [(s, k[mode]) for s, k in pts if len(k) > mode]
                if mode_pts:
                    _line(ax, drawn, f"{run.name}: {layer} K{mode + 1}", *zip(*mode_pts),
                          **dict(series_style(j), linestyle=style))
    for ax, title in zip(axes, MODES):
        ax.set(title=title, ylabel="rank")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, axes, path, empty="no ranks (no HOSVD / SVD run)")
    return drawn


def plot_loss(runs, path) -> dict:
    """Training loss per step, and the validation accuracy at each epoch end."""
    fig, (loss, accuracy) = _figure(2, "training")
    drawn = {}
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        _line(loss, drawn, f"{run.name} loss", [r.step for r in run.steps],
              [r.loss for r in run.steps], color=color)
        if run.epochs:
            _line(accuracy, drawn, f"{run.name} val accuracy", [r["step"] for r in run.epochs],
                  [r["val_accuracy"] for r in run.epochs], color=color, marker="o")
    loss.set(title="training loss", ylabel="loss")
    accuracy.set(title="validation accuracy (epoch ends)", ylabel="accuracy")
    _finish(fig, (loss, accuracy), path)
    return drawn


def plot_fleet(runs, path) -> dict:
    """A fleet's rounds: the central validation accuracy, and each node's peak RSS and
    training working set (MiB) in the rounds it trained."""
    fig, (accuracy, memory) = _figure(2, "fleet")
    drawn = {}
    for i, run in enumerate(runs):
        _line(accuracy, drawn, f"{run.name} central val accuracy",
              [r["round"] for r in run.rounds], [r["val_accuracy"] for r in run.rounds],
              color=f"C{i % 10}", marker="o")
        names = sorted({n["node"] for r in run.rounds for n in r["nodes"]})
        for j, name in enumerate(names):
            pts = [(r["round"], n) for r in run.rounds for n in r["nodes"] if n["node"] == name]
            for label, key, style in (("peak RSS", "peak_rss_bytes", "-"),
                                      ("working set", "working_set_bytes", "--")):
                _line(memory, drawn, f"{run.name}: {name} {label}", [x for x, _ in pts],
                      [n[key] / MIB for _, n in pts], color=f"C{j % 10}", linestyle=style,
                      marker="o")
    accuracy.set(title="central validation accuracy", ylabel="accuracy")
    memory.set(title="memory per node", ylabel="MiB")
    rounds = [r["round"] for run in runs for r in run.rounds]
    for ax in (accuracy, memory):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if rounds:
            ax.set_xlim(min(rounds) - 0.3, max(rounds) + 0.3)
    _finish(fig, (accuracy, memory), path, xlabel="round", empty="no rounds")
    return drawn


PLOTS = {"memory": plot_memory, "kept": plot_kept, "ranks": plot_ranks, "loss": plot_loss,
         "fleet": plot_fleet}


# ---------------------------------------------------------------- summary

def summarise(run: Run) -> dict:
    steps, summary = run.steps, run.summary or {}
    last = steps[-1] if steps else None
    accuracy = run.epochs[-1]["val_accuracy"] if run.epochs else None
    if summary.get("final_val_accuracy") is not None:
        accuracy = summary["final_val_accuracy"]
    budgets = [r.budget_bytes for r in steps if r.budget_bytes is not None]
    # (peak RSS, baseline RSS) of each step, else of each fleet node's round
    peaks = [(r.peak_rss_bytes, r.baseline_rss_bytes) for r in steps] or [
        (n["peak_rss_bytes"], n["baseline_rss_bytes"]) for r in run.rounds for n in r["nodes"]]
    if run.rounds:  # a fleet journal: the global model's accuracy, the nodes' largest peak
        accuracy = run.rounds[-1]["val_accuracy"]
    return {
        "run": run.name, "path": run.path, "method": last.method if last else None,
        "eps": last.eps if last else None,
        "steps": last.step if last else summary.get("steps"), "step_records": len(steps),
        "final_loss": last.loss if last else summary.get("final_train_loss"),
        "val_accuracy": accuracy,
        "median_step_seconds": median(r.step_seconds for r in steps) if steps else None,
        "peak_rss_bytes": max((peak for peak, _ in peaks), default=None),
        "peak_working_bytes": max((peak - base for peak, base in peaks), default=None),
        "kept_bytes_peak": max((r.kept_bytes_total for r in steps), default=None),
        "kept_full_bytes_peak": max((r.kept_full_bytes for r in steps), default=None),
        "budget_bytes": budgets[-1] if budgets else None,
        "budget_violations": sum(bool(r.budget_exceeded) for r in steps),
        "skipped_lines": run.skipped, "spool_overflows": run.overflows,
        "rounds": max((r["round"] for r in run.rounds), default=0),  # rounds after round 0
    }


def _bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / MIB:.2f} MiB" if abs(n) >= MIB else f"{n / KIB:.1f} KiB"


def _num(value, fmt) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


COLUMNS = ("run", "method", "steps", "final loss", "val accuracy", "median step",
           "peak RSS", "peak RSS - baseline", "kept peak (paper / full)", "budget",
           "budget violations", "skipped lines")


def table_row(s: dict) -> list:
    row = METHODS.get(s["method"])
    uses_eps = s["eps"] is not None and row is not None and row.ranks is not None
    method = (s["method"] or "-") + (f" eps {s['eps']}" if uses_eps else "")
    return [s["run"], method, _num(s["steps"], "d"), _num(s["final_loss"], ".4f"),
            _num(s["val_accuracy"], ".4f"),
            "-" if s["median_step_seconds"] is None else f"{s['median_step_seconds'] * 1e3:.1f} ms",
            _bytes(s["peak_rss_bytes"]), _bytes(s["peak_working_bytes"]),
            f"{_bytes(s['kept_bytes_peak'])} / {_bytes(s['kept_full_bytes_peak'])}",
            _bytes(s["budget_bytes"]), str(s["budget_violations"]), str(s["skipped_lines"])]


def write_index(summaries: list, out: Path, figures=FIGURES) -> None:
    rows = [table_row(s) for s in summaries]
    md = ["# Training profile report", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "Peak RSS - baseline is what `--budget` bounds; kept = activations kept for "
               "backward (paper: conv inputs; full: with masks and the classifier input).", ""]
    md += [f"![{name}]({name}.png)\n" for name in figures]
    md += ["Sources: " + ", ".join(f"`{s['path']}`" for s in summaries), ""]
    (out / "index.md").write_text("\n".join(md))
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)
    page = ["<!doctype html><meta charset='utf-8'><title>Training profile report</title>",
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
            "table{border-collapse:collapse}img{max-width:100%}</style>",
            "<h1>Training profile report</h1><table>", f"<tr>{cells('th', COLUMNS)}</tr>"]
    page += [f"<tr>{cells('td', r)}</tr>" for r in rows]
    page += ["</table>"] + [f"<h2>{n}</h2><img src='{n}.png' alt='{n}'>" for n in figures]
    (out / "index.html").write_text("\n".join(page) + "\n")


def build_report(paths, out, budget: int | None = None) -> dict:
    """Read the streams, write <out>/{memory,kept,ranks,loss}.png (fleet.png for a fleet's
    journal; only it when no stream has steps), index.md and index.html; ``budget`` (bytes):
    the memory plot's budget for runs that had none; returns {"runs": [Run], "summaries":
    [dict], "plots": {figure: {label: (x, y)}}}."""
    runs = read_runs([Path(p) for p in paths])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fleet = any(run.rounds for run in runs)
    figures = (FIGURES if not fleet or any(run.steps for run in runs) else ()) + \
        (("fleet",) if fleet else ())
    plot = dict(PLOTS, memory=lambda runs, path: plot_memory(runs, path, budget))
    plots = {name: plot[name](runs, out / f"{name}.png") for name in figures}
    summaries = [summarise(run) for run in runs]
    write_index(summaries, out, figures)
    return {"runs": runs, "summaries": summaries, "plots": plots}
