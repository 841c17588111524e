"""HOSVD / SVD core: ranks on hand-built tensors, exactness, degenerate cases, the oracle."""
import json
import math

import numpy as np
import pytest

from actcomp_edge.core.decomposition import (Tucker, full_rank_bound, hosvd, mode_product,
                                        rank_for_energy, svd_compress, unfold)
from helpers import require_shared


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


def gram_with_spectrum(rng, energies):
    q = orthonormal(rng, len(energies), len(energies))
    return (q * np.asarray(energies, np.float64)) @ q.T


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.7, 0.8, 0.9])
def test_certified_rank_and_vectors_equal_the_full_eigendecomposition(seed, eps):
    """Decaying spectra (as activations have), n = 384: the Krylov path certifies the rank
    and its vectors span eigh's (where the spectrum has a gap after k)."""
    from actcomp_edge.core.decomposition import certified_leading
    rng = np.random.default_rng(seed)
    n = 384
    energies = np.sort(rng.exponential(1.0, n) * np.exp(-np.arange(n) / rng.uniform(2, 12)))[::-1]
    gram = gram_with_spectrum(rng, energies)
    exact, vectors = np.linalg.eigh(gram)
    exact, vectors = exact[::-1], vectors[:, ::-1]
    k = rank_for_energy(exact, eps)
    found = certified_leading(gram, eps)
    assert found is not None and found[0] == k
    u = found[2]
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-10)
    if exact[k - 1] - exact[k] > 1e-3 * exact[0]:
        projector_error = np.linalg.norm(u @ (u.T @ vectors[:, :k]) - vectors[:, :k])
        assert projector_error < 1e-6


TIE = -0.8e-9  # the rule counts a cumulative energy within EQUALITY_SLACK * eps of eps as eps


@pytest.mark.parametrize("offset", [TIE, TIE + 5e-11, TIE - 5e-11, TIE + 1e-9, TIE - 1e-9, 0.0])
def test_near_ties_at_eps_give_the_exact_rank(offset):
    """Spectra whose cumulative energy at rank 5 is eps + offset (of the trace): within the
    certificate's margin of the rule's threshold (eps (1 - 1e-9)) the Krylov path cannot
    tell and leading_vectors falls back to eigh; either way the exact rule's rank."""
    from actcomp_edge.core.decomposition import certified_leading, leading_vectors
    rng = np.random.default_rng(7)
    n, k, eps = 256, 5, 0.8
    tail = np.geomspace(0.2, 1e-4, n - k)
    ratio = eps + offset  # the 5th eigenvalue x: (4 + x) / (4 + x + sum(tail)) = ratio
    x = (ratio * (k - 1 + tail.sum()) - (k - 1)) / (1 - ratio)
    energies = np.concatenate([np.full(k - 1, 1.0), [x], tail])
    gram = gram_with_spectrum(rng, energies)
    exact = np.clip(np.linalg.eigh(gram)[0][::-1], 0, None)
    want = rank_for_energy(exact, eps)
    found = certified_leading(gram, eps)
    assert found is None or found[0] == want
    if abs(offset - TIE) < 1e-10:
        assert found is None  # within the certificate's margin: left to eigh
    if offset == 0.0:
        assert found is not None and found[0] == k
    # through a tensor: a (n, n) "activation" whose mode-0 Gram is this one
    root = np.linalg.cholesky(gram + 1e-300 * np.eye(n))
    a = root.reshape(n, n, 1, 1)
    got = leading_vectors(a, 0, eps=eps).shape[1]
    assert got == rank_for_energy(np.clip(np.linalg.eigh(root @ root.T)[0][::-1], 0, None), eps)


def test_certified_path_and_eigh_give_the_same_tucker():
    """HOSVD of a low-rank-ish (32, 576, 4, 4) activation (its dual Grams are 512 wide): the
    certified path is taken and reconstructs as the eigh-only HOSVD does."""
    from actcomp_edge.core import decomposition
    rng = np.random.default_rng(3)
    a = np.maximum(tensor_of_rank(rng, (32, 576, 4, 4), (6, 24, 4, 4)), 0).astype(np.float32)
    gram, _ = decomposition.smaller_gram(a, 1)
    assert len(gram) >= decomposition.KRYLOV_MIN
    assert decomposition.certified_leading(gram, 0.8) is not None
    fast = hosvd(a, eps=0.8)
    saved = decomposition.KRYLOV_MIN
    decomposition.KRYLOV_MIN = 10 ** 9
    try:
        exact = hosvd(a, eps=0.8)
    finally:
        decomposition.KRYLOV_MIN = saved
    assert fast.rank_per_mode == exact.rank_per_mode
    np.testing.assert_allclose(fast.reconstruct(), exact.reconstruct(), rtol=0,
                               atol=1e-5 * np.abs(a).max())


def cumulative_energy(gram):
    energies = np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None)
    return np.cumsum(energies) / energies.sum()


def test_float32_grams_move_cumulative_energies_far_less_than_the_tolerance():
    """The float32 products of mode_gram change no cumulative energy ratio by more than a
    tenth of GRAM_TOLERANCE, on the paper's real activations (../shared) and on seeded
    non-negative low-rank tensors: ranks from a float32 Gram clear of the tolerance are exact."""
    from actcomp_edge.core.decomposition import GRAM_TOLERANCE, smaller_gram
    oracle = np.load(require_shared("vectors", "hosvd_oracle.npz"))
    rng = np.random.default_rng(11)
    tensors = [oracle[k] for k in oracle.files if k.endswith("/activation")]
    tensors += [np.maximum(tensor_of_rank(rng, shape, ranks), 0) for shape, ranks in
                [((32, 48, 16, 16), (8, 12, 6, 6)), ((16, 576, 4, 4), (6, 40, 3, 3)),
                 ((8, 3, 64, 64), (4, 3, 20, 20))]]
    worst = 0.0
    for a in tensors:
        assert a.dtype == np.float32
        for mode in range(4):
            fast = cumulative_energy(smaller_gram(a, mode)[0])
            exact = cumulative_energy(smaller_gram(a, mode, exact=True)[0])
            worst = max(worst, float(np.abs(fast - exact).max()))
    assert 0 < worst < GRAM_TOLERANCE / 10


@pytest.mark.parametrize("n", [64, 256])  # eigh path, certified Krylov path
@pytest.mark.parametrize("offset", [3e-6, -3e-6, 3e-4, -3e-4])
def test_ranks_near_eps_are_decided_by_the_float64_gram(n, offset, monkeypatch):
    """A float32 activation whose cumulative energy at rank 5 is eps + offset: within
    GRAM_TOLERANCE (1e-5) of eps the float64 Gram decides, past it the float32 one does;
    either way the rank of the exact (float64) eigendecomposition of the same tensor."""
    from actcomp_edge.core import decomposition
    rng = np.random.default_rng(5)
    k, eps = 5, 0.8
    tail = np.geomspace(0.2, 1e-4, n - k)
    x = ((eps + offset) * (k - 1 + tail.sum()) - (k - 1)) / (1 - eps - offset)
    energies = np.concatenate([np.full(k - 1, 1.0), [x], tail])
    a = ((orthonormal(rng, n, n) * np.sqrt(energies)) @ orthonormal(rng, n, n).T)
    a = a.astype(np.float32).reshape(n, n, 1, 1)
    want = rank_for_energy(np.clip(np.linalg.eigvalsh(
        decomposition.mode_gram(a, 0, exact=True))[::-1], 0, None), eps)
    exact_calls = []
    real = decomposition.mode_gram
    monkeypatch.setattr(decomposition, "mode_gram",
                        lambda t, mode, exact=False: exact_calls.append(exact) or real(t, mode, exact))
    got = decomposition.leading_vectors(a, 0, eps=eps).shape[1]
    assert got == want
    assert (True in exact_calls) == (abs(offset) < decomposition.GRAM_TOLERANCE)


def test_activations_whose_squares_overflow_float32_get_the_ranks_of_their_scaled_copy():
    """Values near 1e25 are finite in float32 but their squares are not: the float64 Gram
    decides, and the ranks are the same tensor's at unit scale."""
    rng = np.random.default_rng(2)
    a = np.maximum(tensor_of_rank(rng, (8, 24, 6, 6), (3, 5, 2, 2)), 0)
    assert hosvd(a * np.float32(1e25), eps=0.9).rank_per_mode == hosvd(a, eps=0.9).rank_per_mode
    assert svd_compress(a * np.float32(1e25), eps=0.9).rank == svd_compress(a, eps=0.9).rank
