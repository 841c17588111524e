"""Host tools: device profiles, `actcomp plan --profile`, `actcomp check`, `actcomp report`."""
import json
import math
from collections import namedtuple

import numpy as np
import pytest

from actcomp_edge.host import cli
from actcomp_edge.core.arch import load_spec
from actcomp_edge.core.program import network
from actcomp_edge.core.memory import plan
from actcomp_edge.core.profiles import (ProfileError, Profile, load_profile, parse_size,
                                   profile_names, trainable_param_count)
from helpers import assert_one_line, assert_one_line_error, write_profile

MIB = 2 ** 20
SHIPPED = {"pi-zero-2w", "pi4-2gb", "pi4-4gb", "pi4-8gb", "pi5-8gb", "jetson-nano-4gb",
           "jetson-orin-nano-8gb"}
GOOD = {"name": "test board", "ram": "64MiB", "cores": 1, "budget": 1_500_000,
        "runtime_baseline": "32MiB", "serial_port": "/dev/ttyGS0", "arch": "aarch64",
        "notes": "tiny budget for hand-computed cases"}


Result = namedtuple("Result", "returncode stdout stderr")


def run(capsys, *argv) -> Result:
    """(exit status, stdout, stderr) of `actcomp ARGV` run in this process."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        status = e.code
    out, err = capsys.readouterr()
    return Result(status, out, err)


# ---------------------------------------------------------------- profiles

def test_every_shipped_profile_loads():
    assert SHIPPED <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert isinstance(p, Profile) and p.arch == "aarch64" and p.cores >= 1
        assert p.budget_bytes + p.runtime_baseline_bytes <= p.ram_bytes
        assert load_profile(p.path) == p  # by path too
    zero = load_profile("pi-zero-2w")
    assert (zero.ram_bytes, zero.budget_bytes, zero.serial_port) == (512 * MIB, 160 * MIB,
                                                                     "/dev/ttyGS0")
    assert load_profile("jetson-nano-4gb").serial_port == "/dev/ttyTHS1"


def test_sizes():
    assert parse_size("48MiB") == 48 * MIB
    assert parse_size("512MB") == 512 * 10 ** 6
    assert parse_size("1.5GiB") == 3 * 2 ** 29
    assert parse_size(1000) == 1000 and parse_size("64 KiB") == 65536
    for bad in ("lots", "-5MiB", "0", "12XB", "", True, 1.5, -3):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("changes, key", [
    ({"colour": "red"}, "colour"),                    # unknown key
    ({"budget": "128MiB"}, "budget"),                 # budget > RAM
    ({"budget": "48MiB"}, "budget"),                  # budget + runtime baseline > RAM
    ({"cores": -2}, "cores"),
    ({"cores": "4"}, "cores"),                        # wrong type
    ({"ram": "lots"}, "ram"),                         # bad size string
    ({"ram": "32MiB", "budget": 1000, "runtime_baseline": 1000}, "ram"),  # below 64 MiB
    ({"serial_port": None}, "serial_port"),           # missing
    ({"name": 7}, "name"),
])
def test_bad_profiles_name_the_key(tmp_path, capsys, changes, key):
    path = write_profile(tmp_path / "bad.toml", GOOD, **changes)
    with pytest.raises(ProfileError, match=f"key '{key}'") as info:
        load_profile(path)
    assert_one_line(info.value)
    result = run(capsys, "plan", "--model", "mcunet-in1", "--method", "vanilla", "--layers", 2,
                 "--profile", path)
    assert_one_line_error(result, f"'{key}'")
    assert result.stdout == ""


def test_unknown_profile_and_bad_toml(tmp_path, capsys):
    assert_one_line_error(run(capsys, "plan", "--model", "mcunet-in1", "--method", "vanilla",
                              "--profile", "pi-zero-99"), "pi-zero-2w")
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \"x\nram = 5\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(bad)


# ---------------------------------------------------------------- plan --profile

# mcunet-in1 at 64 px, 10 classes, vanilla: the last three convs see 2x2 maps.
#   blocks.13.project  in (B,576,2,2): 9216 B bytes; no activation after it; W 160*576
#   blocks.13.dw       in (B,576,2,2): 9216 B bytes + ReLU6 mask (B,576,2,2) 2304 bits = 288 B
#   blocks.13.expand   in (B,96,2,2):  1536 B bytes + ReLU6 mask (B,576,2,2) 288 B; W 576*96
#   classifier input (B,160) 640 B bytes; W 160*10 + 10
# weights + gradients + SGD momentum = 3 x 4 bytes per parameter.
def hand_working(n_layers: int, batch: int, state: int = 1) -> int:
    acts = [9216, 9216 + 288, 1536 + 288][:n_layers]
    params = [160 * 576, 576 * 9, 576 * 96][:n_layers]
    return batch * (sum(acts) + 640) + 4 * (2 + state) * (sum(params) + 160 * 10 + 10)


TINY_PLAN = ("plan", "--model", "mcunet-in1", "--method", "vanilla", "--input-size", 64,
             "--num-classes", 10)


def test_plan_profile_keeps_the_plan_and_adds_the_accounting(capsys):
    args = ("plan", "--model", "mcunet-in1", "--method", "hosvd", "--eps", "0.8", "--layers", 4,
            "--batch-size", 32, "--input-size", 128, "--json")
    _, plain, _ = run(capsys, *args)
    status, with_profile, _ = run(capsys, *args, "--profile", "pi-zero-2w")
    plain, with_profile = json.loads(plain), json.loads(with_profile)
    assert status == 0
    assert {k: with_profile[k] for k in plain} == plain  # paper/full columns unchanged
    spec = load_spec("mcunet-in1")
    net = network(spec, 128)
    params = trainable_param_count(spec, net.convs, 4)
    fit = with_profile["fit"]
    assert fit["activation_bytes"] == plan(net, 4, "hosvd", 32, 128, eps=0.8).full_bytes
    assert fit["weight_bytes"] == fit["gradient_bytes"] == fit["optimizer_bytes"] == 4 * params
    assert fit["working_bytes"] == fit["activation_bytes"] + 3 * 4 * params
    assert fit["margin_bytes"] == 160 * MIB - fit["working_bytes"] and fit["fits"]
    assert with_profile["profile"]["runtime_baseline_bytes"] == 100 * MIB
    _, adamw, _ = run(capsys, *args, "--profile", "pi-zero-2w", "--optimizer", "adamw")
    assert json.loads(adamw)["fit"]["optimizer_bytes"] == 2 * 4 * params


def test_plan_profile_numbers_by_hand(tmp_path, capsys):
    tiny = write_profile(tmp_path / "tiny.toml", GOOD)
    for n in (1, 2, 3):
        _, out, _ = run(capsys, *TINY_PLAN, "--layers", n, "--batch-size", 8, "--profile", tiny,
                        "--json")
        fit = json.loads(out)["fit"]
        assert fit["working_bytes"] == hand_working(n, 8)
        assert fit["fits"] == (hand_working(n, 8) <= 1_500_000)


def test_plan_profile_searches_layers_and_batch(tmp_path, capsys):
    tiny = write_profile(tmp_path / "tiny.toml", GOOD)
    # batch 8: N=2 needs 1342328 bytes, N=3 2036600: the largest that fits 1.5 MB is 2
    assert hand_working(2, 8) <= 1_500_000 < hand_working(3, 8)
    status, out, _ = run(capsys, *TINY_PLAN, "--batch-size", 8, "--profile", tiny, "--json")
    result = json.loads(out)
    assert status == 0 and result["search"] == ["layers"]
    assert result["proposals"] == [{"layers": 2, "batch_size": 8,
                                    "working_bytes": hand_working(2, 8),
                                    "margin_bytes": 1_500_000 - hand_working(2, 8)}]
    assert len(result["layers"]) == 3  # the proposal's plan: 2 convs + classifier
    _, text, _ = run(capsys, *TINY_PLAN, "--batch-size", 8, "--profile", tiny)
    assert "proposal: --layers 2 (the largest that fits)" in text and "fits, margin" in text

    # N=2: batch 16 fits (1497208), batch 32 does not (1807008)
    assert hand_working(2, 16) <= 1_500_000 < hand_working(2, 32)
    _, out, _ = run(capsys, *TINY_PLAN, "--layers", 2, "--profile", tiny, "--json")
    assert json.loads(out)["proposals"][0]["batch_size"] == 16

    # both axes: the largest N for every batch size (none from batch 64 on)
    _, out, _ = run(capsys, *TINY_PLAN, "--profile", tiny, "--json")
    found = {p["batch_size"]: p["layers"] for p in json.loads(out)["proposals"]}
    expected = {}
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        fitting = [n for n in (1, 2, 3) if hand_working(n, b) <= 1_500_000]
        if fitting:
            expected[b] = max(fitting)
    assert found == expected == {1: 2, 2: 2, 4: 2, 8: 2, 16: 2, 32: 1}

    # AdamW (2x state): even N=1 at batch 8 is over the budget
    _, out, _ = run(capsys, *TINY_PLAN, "--batch-size", 8, "--optimizer", "adamw",
                    "--profile", tiny, "--json")
    result = json.loads(out)
    assert result["proposals"] == [] and result["fit"]["working_bytes"] == hand_working(1, 8, 2)
    _, text, _ = run(capsys, *TINY_PLAN, "--batch-size", 8, "--optimizer", "adamw",
                     "--profile", tiny)
    assert "no --layers fits" in text and "does NOT fit" in text


def test_plan_search_uses_the_eps_bound_or_exact_ranks(tmp_path, capsys):
    tiny = write_profile(tmp_path / "tiny.toml", GOOD, budget="4MiB")
    spec = load_spec("mcunet-in1", 10)
    net = network(spec, 64)
    for extra, kwargs in ((("--eps", "0.5"), {"eps": 0.5}), (("--ranks", 2, 2, 1, 1),
                                                             {"ranks": (2, 2, 1, 1)})):
        _, out, _ = run(capsys, "plan", "--model", "mcunet-in1", "--method", "hosvd", *extra,
                        "--input-size", 64, "--num-classes", 10, "--batch-size", 16,
                        "--profile", tiny, "--json")
        best = json.loads(out)["proposals"][0]["layers"]
        working = [plan(net, n, "hosvd", 16, 64, **kwargs).full_bytes
                   + 12 * trainable_param_count(spec, net.convs, n)
                   for n in range(1, len(net.convs) + 1)]
        assert best == max(n for n, w in enumerate(working, 1) if w <= 4 * MIB)


def test_plan_still_needs_layers_without_profile(capsys):
    result = run(capsys, "plan", "--model", "mcunet-in1", "--method", "vanilla")
    assert_one_line_error(result, "--layers")
    assert result.stdout == ""


# ---------------------------------------------------------------- check

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from export import zoo
    from export.artifact import export_artifact
    from export.training_graph import TrainConfig
    spec = zoo.load_spec("mcunet-in1", 10)
    model = zoo.build_model(spec)
    out = tmp_path_factory.mktemp("host") / "art"
    export_artifact(spec, zoo.model_arrays(model, spec), out,
                    TrainConfig(n_layers=2, method="hosvd", eps=0.8), 8, 64)
    return out


def test_check_fits_or_not(artifact, tmp_path, capsys):
    status, out, _ = run(capsys, "check", artifact, "--profile", "pi-zero-2w", "--json")
    fit = json.loads(out)["fit"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    spec = load_spec("mcunet-in1", 10)
    params = trainable_param_count(spec, network(spec, 64).convs, 2)
    assert status == 0 and fit["fits"]
    assert fit["weight_bytes"] == fit["gradient_bytes"] == fit["optimizer_bytes"] == 4 * params
    assert fit["activation_bytes"] == manifest["predicted_memory"]["full_bytes"]
    assert fit["working_bytes"] == fit["activation_bytes"] + 12 * params
    assert math.isclose(fit["margin_percent"],
                        100 * (160 * MIB - fit["working_bytes"]) / (160 * MIB), abs_tol=0.01)
    working = fit["working_bytes"]
    # exactly at the budget fits (margin 0); one byte less does not
    status, out, _ = run(capsys, "check", artifact, "--profile", "pi-zero-2w", "--budget", working)
    assert status == 0 and "fits, margin 0.00 MiB (0.0 %)" in out
    tight = write_profile(tmp_path / "tiny.toml", GOOD, budget=working - 1)
    status, out, _ = run(capsys, "check", artifact, "--profile", tight)
    assert status == 1 and "does NOT fit" in out


def test_check_bad_input(artifact, tmp_path, capsys):
    cases = [("check", tmp_path / "nothing", "--profile", "pi-zero-2w"),
             ("check", artifact, "--profile", write_profile(tmp_path / "tiny.toml", GOOD, cores=0)),
             ("check", artifact, "--profile", "pi-zero-2w", "--budget", "lots")]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in artifact.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "weights.npz").write_bytes(b"tampered")
    cases.append(("check", broken, "--profile", "pi-zero-2w"))
    for argv in cases:
        result = run(capsys, *argv)
        assert_one_line_error(result)
        assert result.stdout == "", argv


# ---------------------------------------------------------------- report

LAYERS = ("blocks.13.dw", "blocks.13.project")


def steps(method, n, budget=None, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for s in range(1, n + 1):
        kept = {layer: int(rng.integers(1000, 50000)) for layer in LAYERS}
        ranks = {layer: ([int(k) for k in rng.integers(1, 20, 4)] if method == "hosvd" else None)
                 for layer in LAYERS}
        rss = 100 * MIB + int(rng.integers(0, 20 * MIB))
        records.append({"type": "step", "step": s, "epoch": 1 + (s - 1) // 5,
                        "loss": float(2.0 / s + rng.random() * 0.01), "step_seconds": 0.05 + s / 1000,
                        "rss_bytes": rss, "peak_rss_bytes": rss + 1000, "baseline_rss_bytes": 90 * MIB,
                        "kept_bytes": kept, "kept_bytes_total": sum(kept.values()),
                        "kept_full_bytes": sum(kept.values()) + 4096, "ranks": ranks,
                        "eps": 0.8, "method": method, "budget_bytes": budget,
                        "working_set_bytes": rss + 1000 - 90 * MIB,
                        "predicted_working_set_bytes": 18 * MIB if method == "hosvd" else None,
                        "budget_exceeded": budget is not None and rss + 1000 - 90 * MIB > budget})
    return records


def write_stream(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("streams")
    vanilla = steps("vanilla", 10, seed=1)
    hosvd = steps("hosvd", 12, budget=25 * MIB, seed=2)
    resent = dict(hosvd[3], loss=99.0)  # a resumed run re-sends step 4: the last record wins
    vanilla_path = write_stream(tmp_path / "vanilla.jsonl", vanilla + [
        {"type": "epoch", "epoch": 1, "step": 5, "val_accuracy": 0.5},
        {"type": "epoch", "epoch": 2, "step": 10, "val_accuracy": 0.75}])
    hosvd_path = write_stream(tmp_path / "hosvd.jsonl", hosvd[:4] + [resent] + hosvd[4:] + [
        {"type": "spool_overflow", "dropped": 3}, {"type": "future_thing", "x": 1},
        {"type": "summary", "final_val_accuracy": 0.875}],
        extra_lines=["not json at all", '{"type": "step", "step": "x"}',
                     '{"type": "step", "step": 13, "loss": 0.1, "rss_'])  # torn last line
    return {"vanilla": (vanilla_path, vanilla), "hosvd": (hosvd_path, hosvd[:3] + [resent]
                                                         + hosvd[4:])}


@pytest.fixture(scope="module")
def report(streams, tmp_path_factory):
    from actcomp_edge.host.report import build_report
    out = tmp_path_factory.mktemp("report")
    return out, build_report([streams["vanilla"][0], streams["hosvd"][0]], out)


def test_report_plots_what_it_read(streams, report):
    out, result = report
    plots = result["plots"]
    for name, (_, records) in streams.items():
        x = [r["step"] for r in records]
        assert plots["loss"][f"{name} loss"] == (x, [r["loss"] for r in records])
        assert plots["memory"][f"{name} peak RSS"] == (x, [r["peak_rss_bytes"] / MIB
                                                           for r in records])
        assert plots["memory"][f"{name} RSS - baseline"] == (
            x, [(r["rss_bytes"] - r["baseline_rss_bytes"]) / MIB for r in records])
        for layer in LAYERS:
            assert plots["kept"][f"{name}: {layer}"] == (x, [r["kept_bytes"][layer] / 1024
                                                             for r in records])
        assert plots["kept"][f"{name} full (with masks, classifier input)"][1] == [
            r["kept_full_bytes"] / 1024 for r in records]
    hosvd = streams["hosvd"][1]
    x = [r["step"] for r in hosvd]
    assert x == list(range(1, 13)) and plots["loss"]["hosvd loss"][1][3] == 99.0
    for mode in range(4):
        assert plots["ranks"][f"hosvd: blocks.13.dw K{mode + 1}"] == (
            x, [r["ranks"]["blocks.13.dw"][mode] for r in hosvd])
    assert not any(label.startswith("vanilla") for label in plots["ranks"])  # no ranks
    assert plots["memory"]["hosvd budget"] == (x, [25.0] * 12)
    assert plots["memory"]["hosvd predicted working set (memory plan)"] == (x, [18.0] * 12)
    assert not any("predicted" in label for label in plots["memory"] if "vanilla" in label)
    assert plots["memory"]["hosvd baseline + budget"][1] == [115.0] * 12
    assert "vanilla budget" not in plots["memory"]
    assert plots["loss"]["vanilla val accuracy"] == ([5, 10], [0.5, 0.75])

    vanilla_run, hosvd_run = result["runs"]
    assert (vanilla_run.skipped, hosvd_run.skipped) == (0, 3)
    assert (hosvd_run.overflows, hosvd_run.ignored) == (1, 1)
    s = {x["run"]: x for x in result["summaries"]}
    assert s["hosvd"]["steps"] == 12 and s["hosvd"]["final_loss"] == hosvd[-1]["loss"]
    assert s["hosvd"]["val_accuracy"] == 0.875 and s["vanilla"]["val_accuracy"] == 0.75
    assert s["hosvd"]["budget_violations"] == sum(r["budget_exceeded"] for r in hosvd) > 0
    assert s["hosvd"]["kept_bytes_peak"] == max(r["kept_bytes_total"] for r in hosvd)
    assert s["vanilla"]["peak_rss_bytes"] == max(r["peak_rss_bytes"]
                                                 for r in streams["vanilla"][1])
    assert s["vanilla"]["median_step_seconds"] == pytest.approx(0.0555)

    index = (out / "index.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in index.splitlines()
            if line.startswith("| ") and not line.startswith("| run")}
    assert set(rows) == {"vanilla", "hosvd"}
    assert rows["hosvd"][4].strip() == f"{hosvd[-1]['loss']:.4f}"
    assert rows["vanilla"][4].strip() == f"{streams['vanilla'][1][-1]['loss']:.4f}"
    assert rows["hosvd"][12].strip() == "3"  # skipped lines
    assert (out / "index.html").read_text().count("<img") == 4


def test_report_legends_sit_outside_the_data_and_series_stay_apart(tmp_path):
    """Each legend is right of its axes (never over a line), and two series with equal
    values differ in colour and marker (the lower one still shows)."""
    from actcomp_edge.host.report import _figure, _finish, _line, series_style
    fig, axes = _figure(2, "t")
    drawn = {}
    for ax in axes:
        for j in range(12):
            _line(ax, drawn, f"layer {j}", range(30), [1.0] * 30, **series_style(j))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    _finish(fig, axes, tmp_path / "t.png")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for ax in axes:
        legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= box.x1, (legend, box)
    looks = {tuple(sorted(series_style(j).items())) for j in range(80)}
    assert len(looks) == 80
    assert series_style(0)["marker"] != series_style(1)["marker"]


def test_report_draws_a_given_budget_for_runs_without_one(streams, tmp_path, capsys):
    """The demo trains without --budget and checks against a profile: `report --profile`
    (or --budget) still draws the budget, for the runs whose records have none."""
    from actcomp_edge.host.report import build_report
    result = build_report([streams["vanilla"][0], streams["hosvd"][0]], tmp_path / "r",
                          budget=40 * MIB)
    memory = result["plots"]["memory"]
    x = [r["step"] for r in streams["vanilla"][1]]
    assert memory["vanilla budget (given to the report)"] == (x, [40.0] * len(x))
    assert memory["hosvd budget"][1] == [25.0] * 12  # its own, from its records
    assert "hosvd budget (given to the report)" not in memory
    status, _, err = run(capsys, "report", streams["vanilla"][0], "-o", tmp_path / "p",
                         "--profile", "pi-zero-2w")
    assert status == 0, err


def test_report_pngs_are_not_blank(report):
    from matplotlib.image import imread
    out, _ = report
    for name in ("memory", "kept", "ranks", "loss"):
        image = imread(out / f"{name}.png")[..., :3]
        assert image.shape[0] > 300 and image.shape[1] > 600
        ink = (image < 0.9).any(axis=2).mean()  # share of non-white pixels
        rgb = (image * 255).astype(np.uint32)
        colours = len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))
        assert 0.01 < ink < 0.6 and colours > 20, (name, ink, colours)
        # the lines themselves: matplotlib's first two colours (run 1 / layer 1, run 2 / layer 2)
        for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
            near = (np.abs(rgb.astype(int) - colour).max(axis=2) < 30).sum()
            assert near > 200, (name, colour, near)


def test_report_cli(streams, tmp_path, capsys):
    out = tmp_path / "r"
    status, text, _ = run(capsys, "report", streams["vanilla"][0], streams["hosvd"][0], "-o", out)
    assert status == 0 and "3 malformed lines skipped" in text
    assert all((out / f"{n}.png").is_file() for n in ("memory", "kept", "ranks", "loss"))
    result = run(capsys, "report", tmp_path / "missing.jsonl", "-o", out)
    assert_one_line_error(result, "missing.jsonl")
    assert result.stdout == ""


def test_every_command_has_help(capsys):
    for command in ("plan", "check", "report"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        assert "--profile" in capsys.readouterr().out or command == "report"


def test_plan_search_may_propose_every_resnet_conv_through_the_stem_max_pool(capsys):
    _, out, _ = run(capsys, "plan", "--model", "resnet18", "--method", "gf-r2", "--batch-size", 1,
                    "--input-size", 64, "--profile", "pi5-8gb", "--json")
    assert json.loads(out)["proposals"][0]["layers"] == 20


@pytest.mark.parametrize("model", ["my_net.py:build", "mcunet-in1", "spec.json"])
def test_check_given_a_model_names_plan(model, capsys):
    """check takes an exported artifact; given a model (FILE.py:FUNCTION, a zoo name, a spec)
    it says in one line which command checks a model before export."""
    result = run(capsys, "check", model, "--profile", "pi-zero-2w")
    assert_one_line_error(result, f"`actcomp plan --model {model} --profile pi-zero-2w`")
    assert result.stdout == ""
