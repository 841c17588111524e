"""Activation compression by truncated HOSVD (Tucker) and by mode-1 SVD.

numpy only: this module runs on the device. Shapes follow the paper:
an activation A is (B, C, H, W); mode n = 0..3 is (batch, channel, height, width).

Ranks follow the paper's rule: for mode n the rank K_n is the smallest k such
that the k largest squared singular values of the mode-n unfolding A_(n) hold
at least a fraction eps of their total (equality counts).  The squared singular
values and left singular vectors of A_(n) are the eigenpairs of the Gram matrix
A_(n) A_(n)^T (d_n x d_n), which is far cheaper than an SVD of the d_n x (rest)
unfolding and exact up to float rounding.

Degenerate cases (defined behaviour):
- every rank is at least 1 and at most min(d_n, product of the other dims);
- eps == 1 keeps the full rank min(d_n, rest): reconstruction is exact;
- an all-zero activation gets rank 1 in every mode, unit-vector factors and a
  zero core (reconstruction is the zero tensor);
- a mode of size 1 has rank 1 and factor [[1]] (up to sign).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from numbers import Real
from typing import Optional, Sequence

import numpy as np

# Relative slack when comparing a cumulative energy ratio to eps, so that a
# ratio equal to eps up to float rounding counts as reaching it.
EQUALITY_SLACK = 1e-9


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding: (d_n, product of the other dims), other dims in order."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """tensor x_n matrix: dim n (size d_n) becomes matrix.shape[0]; matrix is (J, d_n)."""
    moved = np.moveaxis(tensor, mode, -1)
    return np.moveaxis(moved @ matrix.T, -1, mode)


GRAM_BLOCK_BYTES = 1 << 20  # working copy per block of mode_gram (1 MiB)
# A float32 Gram's rank decision is trusted only where every cumulative energy the eps rule
# compares lies farther than this (of the trace) from its threshold; nearer, the float64 Gram
# decides. Measured on 384 real mcunet activation modes: float32 moves a cumulative energy by
# at most 6e-7 of the trace (test_float32_grams_move_cumulative_energies_far_less_than_...)
GRAM_TOLERANCE = 1e-5


def mode_gram(tensor: np.ndarray, mode: int, exact: bool = False) -> np.ndarray:
    """A_(n) A_(n)^T, (d_n, d_n) float64: the products in the tensor's precision (float32 for
    an activation; no unfold copy where the layout allows, block by block otherwise), summed
    in float64; ``exact``: float64 products.

    float64 keeps the trailing eigenvalues of a rank-deficient float32 activation at
    ~1e-14 of the largest (a float32 Gram leaves ~1e-7 of noise there), so the rule's rank
    is exact when eps is close to 1 (GRAM_TOLERANCE: when float64 is needed). Either way
    the working copy is one block of GRAM_BLOCK_BYTES, never the whole tensor.
    """
    d = tensor.shape[mode]
    dtype = np.float64 if exact else np.result_type(tensor.dtype, np.float32)
    size = np.dtype(dtype).itemsize
    gram = np.zeros((d, d))
    if mode == 0 or mode == tensor.ndim - 1:  # a reshape is the unfolding (or its transpose)
        m = tensor.reshape(d, -1) if mode == 0 else tensor.reshape(-1, d).T
        step = max(1, GRAM_BLOCK_BYTES // (size * d))
        if dtype == tensor.dtype:
            step = m.shape[1]  # no cast: no working copy
        for j in range(0, m.shape[1], step):
            block = m[:, j:j + step].astype(dtype, copy=False)
            gram += block @ block.T
        return gram
    per_slice = tensor[0].size if tensor.shape[0] else 1
    step = max(1, GRAM_BLOCK_BYTES // (size * per_slice))
    for i in range(0, tensor.shape[0], step):
        block = unfold(tensor[i:i + step], mode).astype(dtype, copy=False)
        gram += block @ block.T
    return gram


def rank_for_energy(energies: np.ndarray, eps: float) -> int:
    """Smallest k with sum(energies[:k]) >= eps * sum(energies); energies sorted descending, >= 0.

    Returns 1 for an all-zero spectrum and len(energies) for eps == 1.
    """
    check_eps(eps)
    total = float(np.sum(energies))
    if total <= 0.0:
        return 1
    if eps >= 1.0:
        return len(energies)
    cumulative = np.cumsum(energies) / total
    return int(np.searchsorted(cumulative, eps * (1.0 - EQUALITY_SLACK), side="left")) + 1


def rank_is_clear(energies: np.ndarray, eps: float, tolerance: float) -> bool:
    """Whether rank_for_energy's rank stays the same when every cumulative energy moves by up
    to ``tolerance`` of the total: no cumulative energy lies that near the threshold."""
    total = float(np.sum(energies))
    if tolerance <= 0.0 or eps >= 1.0:
        return True
    if total <= 0.0:  # all zero in float32 (squares may underflow): float64 decides
        return False
    distance = np.abs(np.cumsum(energies) / total - eps * (1.0 - EQUALITY_SLACK))
    return bool(distance.min() > tolerance)


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, Real) and 0.0 < float(eps) <= 1.0):
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")


def smaller_gram(tensor: np.ndarray, mode: int, exact: bool = False) -> tuple:
    """(G, M) for the mode-n unfolding M = A_(n) (d_n, rest): G = M M^T (d_n x d_n, M None)
    or, when d_n > rest (e.g. 576 channels but B*H*W = 512), G = M^T M (rest x rest) with M
    copied (float64 when ``exact``, else in the tensor's precision); both have the squared singular values of
    M as their eigenvalues. G is float64 (and float64 throughout when float32 overflows)."""
    d_n = tensor.shape[mode]
    rest = tensor.size // d_n if d_n else 0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below
        if d_n <= rest:
            gram, m = mode_gram(tensor, mode, exact), None
        else:
            m = unfold(tensor, mode).astype(np.float64 if exact else
                                            np.result_type(tensor.dtype, np.float32))
            gram = (m.T @ m).astype(np.float64)
    if not exact and not np.isfinite(gram).all():  # float32 squares overflow past ~1e19
        return smaller_gram(tensor, mode, exact=True)
    return gram, m


def left_vectors(m, vectors: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """Left singular vectors U = M V / sigma of M from eigenvectors V of its Gram (M None:
    V are already left vectors); a direction of zero energy gets a zero column."""
    if m is None:
        return vectors
    sigma = np.sqrt(np.clip(energies, 0.0, None))
    scale = np.where(sigma > sigma[0] * 1e-12, 1.0 / np.where(sigma > 0, sigma, 1.0), 0.0)
    return (m @ vectors.astype(m.dtype)) * scale.astype(m.dtype)


def mode_spectrum(tensor: np.ndarray, mode: int, eps=None) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (descending, clipped at 0, at most min(d_n, rest) of them)
    and the matching left singular vectors (d_n, r) of the mode-n unfolding M = A_(n), from
    the smaller Gram (smaller_gram); ``eps``: the Gram is recomputed in float64 when float32
    rounding could change the eps rule's rank (rank_is_clear)."""
    for exact in (False, True):
        gram, m = smaller_gram(tensor, mode, exact)
        energies, vectors = np.linalg.eigh(gram)
        energies = np.clip(energies[::-1], 0.0, None)
        if exact or eps is None or rank_is_clear(energies, eps, GRAM_TOLERANCE):
            return energies, left_vectors(m, vectors[:, ::-1], energies)


def mode_energies(tensor: np.ndarray) -> list:
    """Per mode n, the squared singular values of A_(n), descending (min(d_n, rest) of them,
    from the smaller Gram's eigenvalues)."""
    out = []
    for mode in range(tensor.ndim):
        gram, _ = smaller_gram(tensor, mode)
        out.append(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))
    return out


KRYLOV_MIN = 192        # smaller Grams: eigh outright (it takes < 2 ms here)
KRYLOV_BLOCK = 8        # vectors the Krylov basis grows by at a time
KRYLOV_SHARE = 4        # at most 1/4 of the dimension: past that a full eigh is cheaper
CERTIFY_MARGIN = 1e-10  # of the trace: a certificate must hold by this much (eigh's rounding ~1e-13)
RESIDUAL_TOL = 1e-9     # of the largest eigenvalue: |G U - U theta| of the kept vectors
SUBSPACE_TOL = 1e-8     # their space's angle to the exact one (Davis-Kahan: residual / gap)


def certified_leading(gram: np.ndarray, eps: float, tolerance: float = 0.0) -> tuple | None:
    """(k, theta (k,), vectors (n, k)): the eps rule's rank of the PSD Gram's exact spectrum
    and its leading k eigenpairs, from a block Krylov space instead of a full eigh; None when
    the space (up to half the dimension) cannot show the rank.

    With Ritz pairs (theta, Y) of the space, T = tr G and R = G Y - Y diag(theta):
    - rank <= k: sum_{i<=k} theta_i <= sum_{i<=k} lambda_i (Ky Fan), so theta reaching eps T
      does;
    - rank > k - 1: in the basis [Y, Y_perp], G <= [[diag(theta) + R^T R / eta, 0],
      [0, C + eta I]] for any eta > 0, and every eigenvalue of the complement block C is at
      most nu = ||C||_F = (||G||_F^2 - 2 ||G Y||_F^2 + ||theta||^2)^(1/2) and at most
      tr C = T - sum(theta); so sum_{i<k} lambda_i is at most the k - 1 largest of
      eig(diag(theta) + R^T R / eta) merged with k - 1 copies of min(nu, tr C) + eta.
    Both must hold by (CERTIFY_MARGIN + tolerance) T: then k is the rank an exact eigh of this
    Gram gives, and the rank of any Gram whose cumulative energies are within tolerance T. The kept
    vectors' residual must be below RESIDUAL_TOL theta_1 and their space within SUBSPACE_TOL
    of the exact one (Davis-Kahan), so that they stand for eigh's vectors. The space grows to at
    most n / KRYLOV_SHARE; the certificate is tried at 16 vectors, then every 1.5x."""
    n = len(gram)
    total = float(np.trace(gram))
    if total <= 0.0:
        return None
    check_eps(eps)
    target = eps * total * (1.0 - EQUALITY_SLACK)  # rank_for_energy's threshold
    margin = (CERTIFY_MARGIN + tolerance) * total
    fro2 = float(np.sum(gram * gram))
    rng = np.random.default_rng(n)  # a fixed start: the same result every run and on resume
    block, _ = np.linalg.qr(gram @ rng.standard_normal((n, KRYLOV_BLOCK)))
    basis, images = [block], [gram @ block]
    checked, largest = 0, n // KRYLOV_SHARE
    while True:
        size = sum(b.shape[1] for b in basis)
        if size >= max(2 * KRYLOV_BLOCK, checked * 3 // 2) or size >= largest:
            checked = size
            found = _certify(np.hstack(basis), np.hstack(images), total, fro2, target, margin)
            if found is not None:
                return found
        if size >= largest:
            return None
        v = np.hstack(basis)
        w = images[-1] - v @ (v.T @ images[-1])
        w -= v @ (v.T @ w)  # twice: full reorthogonalisation
        block, r = np.linalg.qr(w)
        keep = np.abs(np.diag(r)) > 1e-12 * np.sqrt(fro2)
        if not keep.any():  # the space is invariant: its Ritz pairs are exact
            return _certify(v, np.hstack(images), total, fro2, target, margin)
        block = block[:, keep]
        basis.append(block)
        images.append(gram @ block)


def _certify(v, gv, total, fro2, target, margin):
    """certified_leading's test on the orthonormal basis v (n, m) with gv = G v."""
    theta, s = np.linalg.eigh(v.T @ gv)
    theta, s = theta[::-1], s[:, ::-1]
    y, gy = v @ s, gv @ s
    cumulative = np.cumsum(theta)
    k = int(np.searchsorted(cumulative, target, side="left")) + 1
    if k > len(theta) or cumulative[k - 1] < target + margin:
        return None
    r = gy - y * theta
    residual = np.linalg.norm(r[:, :k])
    if residual > RESIDUAL_TOL * theta[0]:
        return None
    # Davis-Kahan: the kept space is within residual / gap of the exact one, the gap being
    # theta_k over every other eigenvalue (each at most theta_{k+1}, or nu or tr C outside)
    outside = max(theta[k] if k < len(theta) else 0.0, complement_bound(theta, gy, total, fro2))
    if theta[k - 1] - outside <= residual / SUBSPACE_TOL:
        return None
    if k > 1 and ky_fan_bound(k - 1, theta, r, gy, total, fro2) >= target - margin:
        return None
    return k, theta[:k], y[:, :k]


def complement_bound(theta, gy, total: float, fro2: float) -> float:
    """Every eigenvalue of G outside the Ritz space's block is at most this: min(nu, tr C)."""
    rest_trace = max(0.0, total - float(theta.sum()))
    nu = np.sqrt(max(0.0, fro2 - 2.0 * float(np.sum(gy * gy)) + float(np.sum(theta ** 2))))
    return min(nu, rest_trace)


def ky_fan_bound(j: int, theta, r, gy, total: float, fro2: float) -> float:
    """An upper bound on the sum of the j largest eigenvalues of G from its Ritz values
    theta, residuals r and G y (certified_leading)."""
    outside = complement_bound(theta, gy, total, fro2)
    rtr = r.T @ r
    rnorm = np.sqrt(max(0.0, float(np.trace(rtr))))
    best = np.inf
    for eta in (rnorm * 2.0 ** np.arange(-4, 5) if rnorm > 0 else [0.0]):
        top = np.linalg.eigvalsh(np.diag(theta) + rtr / eta) if eta > 0 else theta
        merged = np.concatenate([top, np.full(j, outside + eta)])
        best = min(best, float(np.sort(merged)[::-1][:j].sum()))
    return best


def leading_vectors(tensor: np.ndarray, mode: int, eps=None, fixed=None, cap=None) -> np.ndarray:
    """The leading K_n left singular vectors (d_n, K_n) of A_(n), K_n by the paper's rule (eps)
    or fixed, capped: the exact rank. From the float32 Gram where its rank is clear of
    GRAM_TOLERANCE, else from the float64 one; the vectors from certified_leading when it
    can show the rank, else from a full eigh."""
    # numpy.random is imported on first use (~20 ms): certified_leading's start block needs it
    by_rule = eps is not None and fixed is None
    for exact in (False, True):
        gram, m = smaller_gram(tensor, mode, exact)
        tolerance = 0.0 if exact else GRAM_TOLERANCE
        if by_rule and len(gram) >= KRYLOV_MIN:
            found = certified_leading(gram, eps, tolerance)
            if found is not None:
                k, theta, vectors = found
                k = _clip_rank(k, len(gram), cap)
                return left_vectors(m, vectors[:, :k], theta[:k])
        energies, vectors = np.linalg.eigh(gram)
        energies = np.clip(energies[::-1], 0.0, None)
        if not by_rule or rank_is_clear(energies, eps, tolerance):
            k = _choose_rank(energies, len(energies), eps, fixed, cap)
            return left_vectors(m, vectors[:, ::-1][:, :k], energies[:k])


def _choose_rank(energies, max_rank, eps, fixed, cap) -> int:
    if fixed is not None:
        k = int(fixed)
        if k < 1:
            raise ValueError(f"ranks must be >= 1, got {fixed}")
    else:
        k = rank_for_energy(energies, eps)
    return _clip_rank(k, max_rank, cap)


def _clip_rank(k: int, max_rank: int, cap) -> int:
    if cap is not None:
        if int(cap) < 1:
            raise ValueError(f"rank caps must be >= 1, got {cap}")
        k = min(k, int(cap))
    return max(1, min(k, max_rank))


def _per_mode(value, ndim: int, what: str) -> list:
    if value is None or np.isscalar(value):
        return [value] * ndim
    value = list(value)
    if len(value) != ndim:
        raise ValueError(f"{what} needs one value per mode ({ndim}), got {len(value)}")
    return value


@dataclass
class Tucker:
    """A ~= core x_1 U_1 x_2 U_2 x_3 U_3 x_4 U_4; core (K_1..K_4), factors[n] (d_n, K_n)."""

    core: np.ndarray
    factors: tuple

    @property
    def rank_per_mode(self) -> tuple:
        return tuple(self.core.shape)

    @property
    def shape(self) -> tuple:
        return tuple(u.shape[0] for u in self.factors)

    @property
    def kept_floats(self) -> int:
        """prod(K_n) + sum(d_n K_n): what the backward keeps instead of A."""
        return int(self.core.size + sum(u.size for u in self.factors))

    def reconstruct(self) -> np.ndarray:
        out = self.core
        for mode, u in enumerate(self.factors):
            out = mode_product(out, u, mode)
        return out


def hosvd(activation: np.ndarray, eps: Optional[float] = None,
          ranks: Optional[Sequence[int]] = None,
          rank_cap: Optional[Sequence[Optional[int]] | int] = None) -> Tucker:
    """Truncated HOSVD of an N-D activation (the paper uses (B, C, H, W)).

    eps: energy threshold per mode (paper rule); or ranks: fixed rank per mode.
    rank_cap: upper bound per mode (int for all modes, or a sequence with None = no cap).
    Factors are computed from the ORIGINAL tensor for every mode (not sequentially
    truncated), as in the paper, so ranks do not depend on mode order.
    """
    if (eps is None) == (ranks is None):
        raise ValueError("give exactly one of eps or ranks")
    if eps is not None:
        check_eps(eps)
    a = np.asarray(activation)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    fixed = _per_mode(ranks, a.ndim, "ranks")
    caps = _per_mode(rank_cap, a.ndim, "rank_cap")
    factors = [np.ascontiguousarray(leading_vectors(a, mode, eps, fixed[mode], caps[mode]),
                                    dtype=a.dtype) for mode in range(a.ndim)]
    return Tucker(project_core(a, factors), tuple(factors))


SPATIAL_VIEW_MIN = 1024  # H * W from which the height mode is multiplied in place (below:
#                          its unfold copy was cheaper than B * C small products, per mode on
#                          mcunet's 42 conv inputs at batch 32, 128 px, an ad-hoc script)


def in_place(shape: tuple, mode: int) -> bool:
    """Whether mode n of a (B, C, H, W) tensor is multiplied without an unfold copy."""
    return len(shape) == 4 and (mode in (1, 3) or mode == 2 and
                                shape[2] * shape[3] >= SPATIAL_VIEW_MIN)


def mode_apply(a: np.ndarray, u: np.ndarray, mode: int) -> np.ndarray:
    """A x_n u^T: dim n (d_n) becomes K; u (d_n, K). For a (B, C, H, W) A (``in_place``) as
    matrix products on views of A (channel: B products (K, C) @ (C, H W); height: B C
    products (K, H) @ (H, W); width: one (B C H, W) @ (W, K)), else mode_product."""
    if not in_place(a.shape, mode):
        return mode_product(a, u.T, mode)
    b, c, h, w = a.shape
    if mode == 1:
        return np.matmul(u.T, a.reshape(b, c, h * w)).reshape(b, -1, h, w)
    if mode == 2:
        return np.matmul(u.T, a.reshape(b * c, h, w)).reshape(b, c, -1, w)
    return (a.reshape(-1, w) @ u).reshape(b, c, h, -1)


GROW_BLOCK_BYTES = 4 << 20  # samples of A a subspace-iteration product takes at a time


def grow_samples(shape: tuple) -> int:
    """Samples of A (B, ...) per block of ``grow``: GROW_BLOCK_BYTES of float32, at least one."""
    return max(1, GROW_BLOCK_BYTES // (4 * max(1, prod(shape[1:]))))


def grow(a: np.ndarray, u: np.ndarray, mode: int) -> np.ndarray:
    """A_(n) (A_(n)^T u), (d_n, K): one step of subspace iteration on mode n (n >= 1), as
    sum_j M_j (M_j^T u) over the unfolding's column blocks M_j of ``grow_samples`` samples:
    its products and copies are a block's, never the whole of A's."""
    step = grow_samples(a.shape)
    return sum(grow_block(a[i:i + step], u, mode) for i in range(0, len(a), step))


def grow_block(a: np.ndarray, u: np.ndarray, mode: int) -> np.ndarray:
    """A_(n) (A_(n)^T u) of one block of samples, on views of it where ``in_place``."""
    if not in_place(a.shape, mode):
        m = unfold(a, mode)
        return m @ (m.T @ u)
    b, c, h, w = a.shape
    z = mode_apply(a, u, mode)
    if mode == 1:
        rows = a.reshape(b, c, h * w)
        return np.matmul(rows, z.reshape(b, -1, h * w).transpose(0, 2, 1)).sum(0)
    if mode == 2:
        rows = a.reshape(b * c, h, w)
        return np.matmul(rows, z.reshape(b * c, -1, w).transpose(0, 2, 1)).sum(0)
    return a.reshape(-1, w).T @ z.reshape(-1, z.shape[3])


SPATIAL_GRAM_MAX_HW = 64  # H * W up to which a subspace step takes both spatial modes from
#                         the (H W, H W) Gram and the partial core through U3 (x) U4: mcunet's
#                         inputs at batch 32, 128 px, 1 BLAS thread: 4x4 maps 0.9-2.9 -> 0.45-1.6
#                         ms a layer, 8x8 1.3-2.1x faster, 16x16 0.6-1.1x (an ad-hoc script,
#                         other work on the machine)


def spatial_grams(a: np.ndarray) -> tuple:
    """The height and width mode Grams (H, H), (W, W) of A (B, C, H, W), from its (H W, H W)
    Gram G: G3 = sum_w G[h, w, h', w], G4 = sum_h G[h, w, h, w']. One product over A."""
    b, c, h, w = a.shape
    flat = a.reshape(b * c, h * w)
    g = (flat.T @ flat).reshape(h, w, h, w)
    return g.trace(axis1=1, axis2=3), g.trace(axis1=0, axis2=2)


def small_map(shape: tuple) -> bool:
    """Whether a (B, C, H, W) tensor's map is small: H W <= SPATIAL_GRAM_MAX_HW."""
    return len(shape) == 4 and shape[2] * shape[3] <= SPATIAL_GRAM_MAX_HW


def subspace_images(a: np.ndarray, factors: Sequence[np.ndarray]) -> dict:
    """n -> A_(n) (A_(n)^T U_n) (d_n, K_n) for the non-batch modes n = 1..3 of A (B, C, H, W):
    ``grow``; on a small map the spatial modes' A_(n) A_(n)^T from ``spatial_grams``."""
    if not small_map(a.shape):
        return {n: grow(a, factors[n - 1], n) for n in range(1, a.ndim)}
    height, width = spatial_grams(a)
    return {1: grow(a, factors[0], 1), 2: height @ factors[1], 3: width @ factors[2]}


def partial_core(a: np.ndarray, us: dict) -> np.ndarray:
    """P = A x_2 U_2^T x_3 U_3^T x_4 U_4^T (B, K2, K3, K4), us: n -> U (d_n, K_n): the modes
    that shrink most first (``mode_apply``); on a small map A's rows (B, C, H W) times
    U_3 (x) U_4, then U_2^T."""
    if not small_map(a.shape):
        partial = a
        for n in sorted(us, key=lambda n: us[n].shape[1] / a.shape[n]):
            partial = mode_apply(partial, us[n], n)
        return partial
    b, c, h, w = a.shape
    spatial = a.reshape(b, c, h * w) @ np.kron(us[2], us[3])              # (B, C, K3 K4)
    partial = np.matmul(us[1].T, spatial)                                  # (B, K2, K3 K4)
    return partial.reshape(b, us[1].shape[1], us[2].shape[1], us[3].shape[1])


def subspace_step(activation: np.ndarray, factors: Sequence[np.ndarray], k1: int) -> Tucker:
    """One step of ASI's compression at fixed ranks (Nguyen et al., ICML 2025), A (B, C, H, W):

        U_n <- orth(A_(n) (A_(n)^T U_n))     n = 2..4, warm-started from the last step's U_n
        P    = A x_2 U_2^T x_3 U_3^T x_4 U_4^T          the partial core (B, K2, K3, K4)
        U_1  = the K1 leading left singular vectors of P_(1) (the samples differ every step)
        core = U_1^T P_(1)

    factors: the last step's U_2, U_3, U_4. orth is a thin QR. No Gram wider than d_n x K_n
    (but a small map's (H W, H W) one) and no eigendecomposition but P's B x B one. K1 is
    at most B. The products run on views of A, a block of samples at a time where they can
    (``subspace_images``, ``partial_core``; the whole step over mcunet's 42 inputs at batch
    32, 128 px: benchmarks/scripts/numpy_parts.py)."""
    a = np.asarray(activation)
    us = {n: np.linalg.qr(y)[0].astype(a.dtype)                          # (d_n, K_n)
          for n, y in subspace_images(a, factors).items()}
    partial = partial_core(a, us)
    rows = np.ascontiguousarray(partial).reshape(a.shape[0], -1)        # P_(1) (B, K2 K3 K4)
    rows64 = rows.astype(np.float64)                                     # one float64 copy
    _, vectors = np.linalg.eigh(rows64 @ rows64.T)
    del rows64
    u1 = np.ascontiguousarray(vectors[:, ::-1][:, :min(k1, a.shape[0])], dtype=a.dtype)
    core = (u1.T @ rows).reshape((u1.shape[1],) + partial.shape[1:])
    return Tucker(np.ascontiguousarray(core), (u1, *(us[n] for n in sorted(us))))


def project_core(activation: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
    """core = A x_1 U_1^T x_2 U_2^T ...; the modes that shrink most go first (fewest flops)."""
    core = activation
    order = sorted(range(activation.ndim),
                   key=lambda n: factors[n].shape[1] / max(1, activation.shape[n]))
    for mode in order:
        core = mode_product(core, factors[mode].T, mode)
    return np.ascontiguousarray(core)


@dataclass
class LowRank:
    """Mode-1 SVD: A_(1) (B, C*H*W) ~= left @ right; left = U_k diag(s_k) (B, k), right = V_k^T (k, C*H*W)."""

    left: np.ndarray
    right: np.ndarray
    shape: tuple

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def kept_floats(self) -> int:
        """k (B + C*H*W)."""
        return int(self.left.size + self.right.size)

    def reconstruct(self) -> np.ndarray:
        return (self.left @ self.right).reshape(self.shape)


def svd_compress(activation: np.ndarray, eps: Optional[float] = None,
                 rank: Optional[int] = None, rank_cap: Optional[int] = None) -> LowRank:
    """Truncated SVD of the mode-1 (batch) unfolding, rank by the paper's eps rule or fixed."""
    if (eps is None) == (rank is None):
        raise ValueError("give exactly one of eps or rank")
    if eps is not None:
        check_eps(eps)
    a = np.asarray(activation)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    energies, vectors = mode_spectrum(a, 0, eps)
    k = _choose_rank(energies, vectors.shape[1], eps, rank, rank_cap)
    u = vectors[:, :k].astype(a.dtype)
    m = unfold(a, 0)
    # U_k^T A_(1) = diag(s_k) V_k^T; split the scale so that left = U_k diag(s_k).
    scaled_right = u.T @ m
    sigma = np.sqrt(energies[:k]).astype(a.dtype)
    safe = np.where(sigma > 0, sigma, 1).astype(a.dtype)
    left = u * sigma
    right = np.where(sigma[:, None] > 0, scaled_right / safe[:, None], 0).astype(a.dtype)
    return LowRank(np.ascontiguousarray(left), np.ascontiguousarray(right), tuple(a.shape))


def full_rank_bound(shape: Sequence[int]) -> tuple:
    """Largest possible HOSVD rank per mode: min(d_n, product of the other dims)."""
    total = prod(shape)
    return tuple(min(d, total // d) if d else 0 for d in shape)
