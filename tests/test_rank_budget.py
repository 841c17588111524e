"""Ranks for an activation budget (actcomp_edge.rank_budget), against hand-worked cases, and
the runner choosing them on its first batch."""
import json

import numpy as np
import pytest

from actcomp_edge import rank_budget as rb


def one_layer():
    """A (4, 2, 1, 1) activation whose batch and channel modes each hold energies 3 and 1 of
    4, and whose 1-wide modes hold all 4. Kept floats at ranks K: K1 K2 + 4 K1 + 2 K2 + 2:
    rank 1: 9 floats (36 bytes); channel raised: 12 (48); batch raised: 14 (56); both: 18."""
    shape = (4, 2, 1, 1)
    energies = [np.array([3.0, 1.0]), np.array([3.0, 1.0]), np.array([4.0]), np.array([4.0])]
    return {"a": shape}, {"a": energies}


def test_tucker_bytes_and_error_bound_by_hand():
    shapes, spectra = one_layer()
    assert [rb.tucker_bytes(shapes["a"], k) for k in
            [(1, 1, 1, 1), (1, 2, 1, 1), (2, 1, 1, 1), (2, 2, 1, 1)]] == [36, 48, 56, 72]
    assert rb.error_bound(spectra["a"], (1, 1, 1, 1)) == pytest.approx(0.5)  # (1 + 1) / 4
    assert rb.error_bound(spectra["a"], (1, 2, 1, 1)) == pytest.approx(0.25)
    assert rb.error_bound(spectra["a"], (2, 2, 1, 1)) == 0.0


@pytest.mark.parametrize("budget, ranks", [
    (36, (1, 1, 1, 1)), (47, (1, 1, 1, 1)),
    # the channel raise removes 1/4 of the bound for 12 bytes, the batch one 1/4 for 20: the
    # channel goes first; the batch raise then costs 24 more
    (48, (1, 2, 1, 1)), (71, (1, 2, 1, 1)), (72, (2, 2, 1, 1)), (10 ** 6, (2, 2, 1, 1))])
def test_allocate_by_hand(budget, ranks):
    shapes, spectra = one_layer()
    assert rb.allocate(spectra, shapes, budget) == {"a": ranks}


def test_allocate_spends_on_the_layer_that_gains_most():
    """Two such layers, the second with all its batch/channel energy in the first direction:
    raising it removes nothing, so the budget for one raise goes to the first layer."""
    shapes, spectra = one_layer()
    shapes["b"] = shapes["a"]
    spectra["b"] = [np.array([4.0, 0.0]), np.array([4.0, 0.0]), np.array([4.0]), np.array([4.0])]
    assert rb.allocate(spectra, shapes, 36 + 36 + 12) == {"a": (1, 2, 1, 1), "b": (1, 1, 1, 1)}


def test_allocate_refuses_a_budget_below_rank_one():
    shapes, spectra = one_layer()
    with pytest.raises(ValueError, match="below rank 1 in every mode"):
        rb.allocate(spectra, shapes, 35)


def test_allocate_fits_the_budget_on_real_spectra():
    """Random activations: the chosen ranks' bytes never exceed the budget, and a larger
    budget never gives a larger error bound."""
    from actcomp_edge.decomposition import mode_energies
    rng = np.random.default_rng(0)
    shapes = {"x": (8, 6, 5, 5), "y": (8, 12, 3, 3)}
    spectra = {n: mode_energies(rng.standard_normal(s).astype(np.float32) ** 2)
               for n, s in shapes.items()}
    bounds = []
    for budget in (2_000, 4_000, 8_000, 16_000):
        ranks = rb.allocate(spectra, shapes, budget)
        assert sum(rb.tucker_bytes(shapes[n], k) for n, k in ranks.items()) <= budget
        bounds.append(sum(rb.error_bound(spectra[n], k) for n, k in ranks.items()))
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] < bounds[0]


def test_runner_chooses_ranks_for_the_budget_on_its_first_batch(tmp_path, image_folder):
    """actcomp export --method asi --activation-budget; the runner picks the ranks on its
    first batch, says so, and keeps them: the summary's fixed ranks fit the budget."""
    from device_helpers import device, train_args
    from test_export import run_cli
    art = tmp_path / "art"
    budget = 48 * 1024
    proc = run_cli("export", "--model", "mcunet-in1", "--num-classes", "3", "--layers", "3",
                   "--method", "asi", "--activation-budget", str(budget), "--batch-size", "8",
                   "--input-size", "64", "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["train"]["activation_budget"] == budget and manifest["train"]["eps"] is None
    summary = tmp_path / "summary.json"
    proc = device(*train_args(art, image_folder, tmp_path / "run", "--max-steps", "2",
                              "--summary", str(summary)))
    assert proc.returncode == 0, proc.stderr
    assert "activation budget 0.05 MiB: ranks chosen on the first 8 training images" in proc.stdout
    s = json.loads(summary.read_text())
    shapes = {layer["name"]: (8, *layer["input_shape"]) for layer in manifest["trainable_layers"]}
    assert set(s["fixed_ranks"]) == set(shapes)
    kept = sum(rb.tucker_bytes(shapes[n], tuple(k)) for n, k in s["fixed_ranks"].items())
    assert kept <= budget and s["activation_budget_bytes"] == budget
    assert s["kept_bytes_peak"]["paper"] == kept
