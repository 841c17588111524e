"""Ranks for an activation budget (actcomp_edge.core.rank_budget), against hand-worked cases, and
the runner choosing them on its first batch."""
import json

import numpy as np
import pytest

from actcomp_edge.core import rank_budget as rb


def one_layer():
    """A (4, 2, 1, 1) activation whose batch and channel modes each hold energies 3 and 1 of
    4 (cumulative 0.75, 1), and whose 1-wide modes hold all 4. Kept floats at ranks K:
    K1 K2 + 4 K1 + 2 K2 + 2: rank 1: 9 floats (36 bytes); batch and channel at 2: 18 (72)."""
    shape = (4, 2, 1, 1)
    energies = [np.array([3.0, 1.0]), np.array([3.0, 1.0]), np.array([4.0]), np.array([4.0])]
    return {"a": shape}, {"a": energies}


def test_tucker_bytes_by_hand():
    shapes, _ = one_layer()
    assert [rb.tucker_bytes(shapes["a"], k) for k in
            [(1, 1, 1, 1), (1, 2, 1, 1), (2, 1, 1, 1), (2, 2, 1, 1)]] == [36, 48, 56, 72]
    assert rb.minimum_bytes({"a": (4, 2, 1, 1), "b": (8, 3, 2, 2)}) == 36 + 4 * (1 + 15)


@pytest.mark.parametrize("budget, ranks, eps", [
    (36, (1, 1, 1, 1), 0.375), (71, (1, 1, 1, 1), 0.375), (72, (2, 2, 1, 1), 0.875),
    (10 ** 6, (2, 2, 1, 1), 0.875)])
def test_allocate_by_hand(budget, ranks, eps):
    """eps up to 0.75 keeps rank 1 (3 of 4 is 0.75), anything above needs rank 2 in both
    modes; the eps reported is the middle of the interval that gives the ranks."""
    shapes, spectra = one_layer()
    assert rb.allocate(spectra, shapes, budget) == ({"a": ranks}, eps)


def test_allocate_takes_the_largest_eps_that_fits_over_all_layers():
    """A second layer whose batch and channel energies are 1 and 1 (cumulative 0.5, 1): at
    eps 0.5 both layers keep rank 1 (72 bytes); at 0.75 the second needs rank 2 in both
    (36 + 72 = 108); at 1 both do (144)."""
    shapes, spectra = one_layer()
    shapes["b"] = shapes["a"]
    spectra["b"] = [np.array([1.0, 1.0]), np.array([1.0, 1.0]), np.array([2.0]), np.array([2.0])]
    low = {"a": (1, 1, 1, 1), "b": (1, 1, 1, 1)}
    assert rb.allocate(spectra, shapes, 107) == (low, 0.25)
    assert rb.allocate(spectra, shapes, 108) == ({"a": (1, 1, 1, 1), "b": (2, 2, 1, 1)}, 0.625)
    assert rb.allocate(spectra, shapes, 144) == ({"a": (2, 2, 1, 1), "b": (2, 2, 1, 1)}, 0.875)


def test_allocate_refuses_a_budget_below_rank_one():
    shapes, spectra = one_layer()
    with pytest.raises(ValueError, match="below rank 1 in every mode"):
        rb.allocate(spectra, shapes, 35)


def test_allocate_fits_the_budget_and_matches_hosvd_on_real_activations():
    """Random activations: the chosen ranks' bytes never exceed the budget, grow with it, and
    are the ranks decomposition.hosvd gives at the chosen eps."""
    from actcomp_edge.core.decomposition import hosvd, mode_energies
    rng = np.random.default_rng(0)
    acts = {"x": rng.standard_normal((8, 6, 5, 5)).astype(np.float32) ** 2,
            "y": rng.standard_normal((8, 12, 3, 3)).astype(np.float32) ** 2}
    shapes = {n: a.shape for n, a in acts.items()}
    spectra = {n: mode_energies(a) for n, a in acts.items()}
    kept = []
    for budget in (2_000, 4_000, 8_000, 16_000):
        ranks, eps = rb.allocate(spectra, shapes, budget)
        kept.append(sum(rb.tucker_bytes(shapes[n], k) for n, k in ranks.items()))
        assert kept[-1] <= budget
        for n, a in acts.items():
            assert hosvd(a, eps=eps).rank_per_mode == ranks[n]
    assert kept == sorted(kept) and kept[-1] > kept[0]


def test_runner_chooses_ranks_for_the_budget_on_its_first_batch(tmp_path, image_folder):
    """actcomp export --method asi --activation-budget; the runner picks the ranks on its
    first batch, says so, and keeps them: the summary's fixed ranks fit the budget."""
    from device_helpers import device, train_args
    from helpers import actcomp
    art = tmp_path / "art"
    budget = 48 * 1024
    proc = actcomp("export", "--model", "mcunet-in1", "--num-classes", "3", "--layers", "3",
                   "--method", "asi", "--activation-budget", str(budget), "--batch-size", "8",
                   "--input-size", "64", "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["train"]["activation_budget"] == budget and manifest["train"]["eps"] is None
    summary = tmp_path / "summary.json"
    proc = device(*train_args(art, image_folder, tmp_path / "run", "--max-steps", "2",
                              "--summary", str(summary)))
    assert proc.returncode == 0, proc.stderr
    assert "activation budget 0.05 MiB: the eps rule at eps" in proc.stdout
    assert "on the first 8 training images" in proc.stdout
    s = json.loads(summary.read_text())
    shapes = {layer["name"]: (8, *layer["input_shape"]) for layer in manifest["trainable_layers"]}
    assert set(s["fixed_ranks"]) == set(shapes)
    kept = sum(rb.tucker_bytes(shapes[n], tuple(k)) for n, k in s["fixed_ranks"].items())
    assert kept <= budget and s["activation_budget_bytes"] == budget
    assert s["kept_bytes_peak"]["paper"] == kept
