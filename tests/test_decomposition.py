"""HOSVD / SVD core: ranks on hand-built tensors, exactness, degenerate cases, the oracle."""
import json
import math

import numpy as np
import pytest

from actcomp_edge.decomposition import (Tucker, full_rank_bound, hosvd, mode_product,
                                        rank_for_energy, svd_compress, unfold)
from conftest import require_shared


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def tensor_of_rank(rng, shape, ranks, dtype=np.float32):
    """A random tensor whose mode-n unfoldings have exactly rank ranks[n]."""
    core = rng.standard_normal(ranks)
    factors = [orthonormal(rng, d, k) for d, k in zip(shape, ranks)]
    return Tucker(core, tuple(factors)).reconstruct().astype(dtype)


def test_unfold_matches_definition():
    a = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    m = unfold(a, 1)
    assert m.shape == (3, 40)
    # column index runs over (b, h, w) in order
    assert m[2, 1 * 20 + 3 * 5 + 4] == a[1, 2, 3, 4]


def test_mode_product_is_matrix_product_on_unfolding():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 5))
    u = rng.standard_normal((7, 4))
    out = mode_product(a, u, 2)
    assert out.shape == (2, 3, 7, 5)
    np.testing.assert_allclose(unfold(out, 2), u @ unfold(a, 2), rtol=1e-12)


@pytest.mark.parametrize("shape,ranks", [((8, 16, 6, 6), (3, 5, 2, 4)),
                                         ((5, 32, 7, 7), (5, 1, 7, 3)),
                                         ((16, 24, 4, 4), (1, 1, 1, 1))])
def test_ranks_of_known_multilinear_rank(shape, ranks):
    rng = np.random.default_rng(1)
    a = tensor_of_rank(rng, shape, ranks)
    t = hosvd(a, eps=1 - 1e-9)
    assert t.rank_per_mode == ranks
    np.testing.assert_allclose(t.reconstruct(), a, atol=1e-5 * np.abs(a).max())


def test_rank_rule_hand_computed():
    energies = np.array([5.0, 3.0, 1.0, 1.0])  # cumulative ratios 0.5, 0.8, 0.9, 1.0
    assert rank_for_energy(energies, 0.5) == 1   # equality counts
    assert rank_for_energy(energies, 0.51) == 2
    assert rank_for_energy(energies, 0.8) == 2   # 0.8 reached exactly (up to rounding)
    assert rank_for_energy(energies, 0.85) == 3
    assert rank_for_energy(energies, 0.9) == 3
    assert rank_for_energy(energies, 0.95) == 4
    assert rank_for_energy(energies, 1.0) == 4
    assert rank_for_energy(np.zeros(3), 0.8) == 1


def test_ranks_from_diagonal_tensor_hand_computed():
    # mode-1 unfolding has singular values sqrt(5), sqrt(3), 1, 1 -> energies 5,3,1,1
    a = np.zeros((4, 4, 1, 1), dtype=np.float32)
    for i, e in enumerate([5.0, 3.0, 1.0, 1.0]):
        a[i, i, 0, 0] = math.sqrt(e)
    assert hosvd(a, eps=0.8).rank_per_mode == (2, 2, 1, 1)
    assert hosvd(a, eps=0.81).rank_per_mode == (3, 3, 1, 1)
    assert svd_compress(a, eps=0.5).rank == 1


def test_core_is_projection_and_kept_floats():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 10, 5, 5)).astype(np.float32)
    t = hosvd(a, ranks=(2, 3, 4, 2))
    core = a.astype(np.float64)
    for n, u in enumerate(t.factors):
        core = mode_product(core, u.T.astype(np.float64), n)
    np.testing.assert_allclose(t.core, core, rtol=1e-4, atol=1e-5)
    assert t.kept_floats == 2 * 3 * 4 * 2 + 6 * 2 + 10 * 3 + 5 * 4 + 5 * 2
    for u in t.factors:
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)


def test_eps_one_is_exact_and_full_rank():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 40, 4, 5)).astype(np.float32)
    t = hosvd(a, eps=1.0)
    assert t.rank_per_mode == full_rank_bound(a.shape) == (3, 40, 4, 5)
    np.testing.assert_allclose(t.reconstruct(), a, atol=1e-5)
    s = svd_compress(a, eps=1.0)
    assert s.rank == 3
    np.testing.assert_allclose(s.reconstruct(), a, atol=1e-5)


def test_mode_larger_than_rest_is_capped():
    a = np.random.default_rng(4).standard_normal((2, 64, 2, 2)).astype(np.float32)
    t = hosvd(a, eps=1.0)
    assert t.rank_per_mode[1] == 8  # min(64, 2*2*2)
    np.testing.assert_allclose(t.reconstruct(), a, atol=1e-5)


def test_all_zero_activation():
    a = np.zeros((4, 8, 3, 3), dtype=np.float32)
    t = hosvd(a, eps=0.9)
    assert t.rank_per_mode == (1, 1, 1, 1)
    assert not t.core.any()
    assert not t.reconstruct().any()
    s = svd_compress(a, eps=0.9)
    assert s.rank == 1 and not s.reconstruct().any() and np.isfinite(s.right).all()


def test_mode_of_size_one():
    a = np.random.default_rng(5).standard_normal((1, 6, 1, 4)).astype(np.float32)
    t = hosvd(a, eps=0.7)
    assert t.rank_per_mode[0] == 1 and t.rank_per_mode[2] == 1
    np.testing.assert_allclose(np.abs(t.factors[0]), [[1.0]])


def test_rank_cap_and_fixed_ranks():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((8, 16, 5, 5)).astype(np.float32)
    assert hosvd(a, eps=0.99, rank_cap=3).rank_per_mode == (3, 3, 3, 3)
    assert hosvd(a, eps=0.99, rank_cap=(None, 2, None, 1)).rank_per_mode[1:4:2] == (2, 1)
    assert hosvd(a, ranks=(100, 2, 3, 4)).rank_per_mode == (8, 2, 3, 4)  # clipped to the bound
    assert svd_compress(a, eps=0.99, rank_cap=2).rank == 2


def test_svd_left_is_u_sigma():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    s = svd_compress(a, rank=3)
    u, sigma, vt = np.linalg.svd(unfold(a, 0).astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.linalg.norm(s.left, axis=0), sigma[:3], rtol=1e-5)
    np.testing.assert_allclose(np.abs(s.right), np.abs(vt[:3]), atol=1e-4)
    assert s.kept_floats == 3 * (6 + 48)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_eps(bad):
    with pytest.raises(ValueError, match="eps"):
        hosvd(np.ones((2, 2, 2, 2)), eps=bad)


def test_needs_exactly_one_of_eps_or_ranks():
    with pytest.raises(ValueError):
        hosvd(np.ones((2, 2, 2, 2)))
    with pytest.raises(ValueError):
        hosvd(np.ones((2, 2, 2, 2)), eps=0.5, ranks=(1, 1, 1, 1))


def test_official_ranks_on_real_activations():
    """Ranks of the paper's published code on real MCUNet activations (../shared/vectors)."""
    oracle = np.load(require_shared("vectors", "hosvd_oracle.npz"))
    cases = json.loads(require_shared("vectors", "hosvd_oracle.json").read_text())
    assert len(cases) >= 24
    for case in cases:
        key = f"{case['model']}/{case['layer']}"
        a = oracle[f"{key}/activation"]
        eps = case["eps"]
        t = hosvd(a, eps=eps)
        assert t.rank_per_mode == tuple(oracle[f"{key}/eps{eps}/hosvd_ranks"]), (key, eps)
        assert t.kept_floats == case["hosvd_kept_floats"]
        assert svd_compress(a, eps=eps).rank == int(oracle[f"{key}/eps{eps}/svd_rank"]), (key, eps)
