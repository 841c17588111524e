"""The methods' table (what the device keeps, its size and dims), sum pooling, ASI's stateful
subspace iteration."""
import numpy as np
import pytest

from actcomp_edge.core.arch import ConvLayer, conv_out
from actcomp_edge.core.decomposition import hosvd, subspace_step
from actcomp_edge.core.methods import BATCH, METHODS, Asi, compress, method, sum_pool


def test_sum_pool_hand_computed():
    x = np.arange(1 * 1 * 3 * 5, dtype=np.float32).reshape(1, 1, 3, 5)
    # rows [0,1] and [2,pad]; cols [0,1] [2,3] [4,pad]
    expected = np.array([[0 + 1 + 5 + 6, 2 + 3 + 7 + 8, 4 + 9],
                         [10 + 11, 12 + 13, 14]], dtype=np.float32)
    np.testing.assert_array_equal(sum_pool(x, 2)[0, 0], expected)
    kept = compress("gf-r2", np.ones((2, 3, 7, 7), np.float32), stride=2)
    assert kept.pieces["x_sum"].shape == (2, 3, 2, 2)  # ceil(7 / 4)
    assert kept.pieces["x_sum"][0, 0, 0, 0] == 16 and kept.pieces["x_sum"][0, 0, 1, 1] == 9


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("stride", [1, 2])
def test_each_method_keeps_what_its_row_says(name, stride):
    """The pieces compress makes have the row's names and dims (ranks as the Kept's), and
    their floats are the row's kept_floats at those ranks."""
    row = method(name)
    x = np.random.default_rng(0).standard_normal((4, 6, 5, 7)).astype(np.float32)
    compressor = row.tracker(eps=0.9) if row.tracker else (
        lambda a: row.compress(a, 0.9, None, None, stride))
    kept = compressor(x)
    assert tuple(kept.pieces) == row.pieces
    assert kept.nbytes == sum(a.nbytes for a in kept.pieces.values())
    conv = ConvLayer("c", 6, 8, 3, stride, 1, 1, (5, 7), (conv_out(5, 3, stride, 1),
                                                           conv_out(7, 3, stride, 1)))
    ranks = dict(zip(row.rank_symbols, kept.rank_per_mode or ()))
    for piece, dims in zip(row.pieces, row.piece_dims(conv)):
        want = tuple(4 if d == BATCH else ranks[d] if isinstance(d, str) else d for d in dims)
        assert kept.pieces[piece].shape == want, piece
    assert kept.nbytes == 4 * row.kept_floats(x.shape, kept.rank_per_mode, stride)
    assert (row.ranks is None) == (kept.rank_per_mode is None)


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'tucker': choose one of vanilla, "):
        method("tucker")


def drifting(rng, steps, shape, ranks, drift=0.02):
    """Activations of a fixed multilinear structure whose channel/spatial factors drift."""
    base = [np.linalg.qr(rng.standard_normal((d, k)))[0] for d, k in zip(shape[1:], ranks[1:])]
    for _ in range(steps):
        base = [np.linalg.qr(u + drift * rng.standard_normal(u.shape))[0] for u in base]
        core = rng.standard_normal((shape[0],) + tuple(ranks[1:]))
        x = core
        for mode, u in enumerate(base, start=1):
            x = np.moveaxis(np.moveaxis(x, mode, -1) @ u.T, -1, mode)
        yield (x + 0.01 * rng.standard_normal(shape)).astype(np.float32)


def captured(x, kept):
    core = kept.pieces["core"]
    return float(np.sum(core.astype(np.float64) ** 2) / np.sum(x.astype(np.float64) ** 2))


def test_asi_follows_a_drifting_subspace():
    """Ranks fixed by the eps rule at the first step; later steps capture within 1 % of the
    exact HOSVD's energy at the same ranks, with orthonormal factors."""
    rng = np.random.default_rng(1)
    asi = Asi(eps=0.95)
    ranks, energies = [], []
    for x in drifting(rng, 20, (16, 64, 6, 6), (16, 5, 3, 3)):
        kept = asi(x)
        ranks.append(kept.rank_per_mode)
        exact = hosvd(x, ranks=kept.rank_per_mode)
        energies.append((captured(x, kept), float(np.sum(exact.core.astype(np.float64) ** 2)
                                                   / np.sum(x.astype(np.float64) ** 2))))
        for name in ("u_batch", "u_channel", "u_height", "u_width"):
            u = kept.pieces[name]
            np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-4)
    assert len(set(ranks)) == 1 and ranks[0][1] == 5    # fixed from the first step on
    for followed, exact in energies:
        assert followed >= exact - 0.01


@pytest.mark.parametrize("shape", [(7, 9, 5, 6), (3, 9, 32, 40)])  # small, large H * W
@pytest.mark.parametrize("block_bytes", [None, 1])  # grow's blocks: all samples, one each
def test_asi_subspace_step_against_numpy_subspace_iteration(shape, block_bytes, monkeypatch):
    """Each non-batch factor spans G_n U (G_n = A_(n) A_(n)^T, from an einsum, not unfold);
    the batch factor spans the leading left singular vectors of the partial core (numpy's
    SVD); the core is A projected on the four factors."""
    from actcomp_edge.core import decomposition
    if block_bytes:
        monkeypatch.setattr(decomposition, "GROW_BLOCK_BYTES", block_bytes)
        assert decomposition.grow_samples(shape) == 1
    rng = np.random.default_rng(4)
    a = rng.standard_normal(shape)
    previous = [np.linalg.qr(rng.standard_normal((d, k)))[0]
                for d, k in zip(shape[1:], (4, 3, 2))]
    t = subspace_step(a, previous, k1=3)
    grams = [np.einsum("bchw,bdhw->cd", a, a), np.einsum("bchw,bcgw->hg", a, a),
             np.einsum("bchw,bchv->wv", a, a)]

    def projector(u):
        q = np.linalg.qr(u)[0]
        return q @ q.T
    for u, gram, prev in zip(t.factors[1:], grams, previous):
        np.testing.assert_allclose(projector(u), projector(gram @ prev), atol=1e-8)
    u2, u3, u4 = (np.linalg.qr(gram @ prev)[0] for gram, prev in zip(grams, previous))
    partial = np.einsum("bchw,ci,hj,wk->bijk", a, u2, u3, u4).reshape(shape[0], -1)
    left = np.linalg.svd(partial)[0][:, :3]
    np.testing.assert_allclose(projector(t.factors[0]), projector(left), atol=1e-8)
    np.testing.assert_allclose(
        t.core, np.einsum("bchw,bl,ci,hj,wk->lijk", a, *t.factors), atol=1e-8)


def test_asi_fixed_ranks_a_short_batch_and_a_checkpoint():
    rng = np.random.default_rng(2)
    asi = Asi(ranks=(4, 3, 2, 2))
    x = rng.standard_normal((8, 10, 4, 4)).astype(np.float32)
    assert asi(x).rank_per_mode == (4, 3, 2, 2)
    assert asi(x[:2]).rank_per_mode == (2, 3, 2, 2)   # last batch smaller than K1
    assert asi(x).rank_per_mode == (4, 3, 2, 2)       # K1 stays what the first step fixed
    resumed = Asi(ranks=(4, 3, 2, 2))
    resumed.restore(asi.state())
    a, b = asi(x), resumed(x)
    for piece in a.pieces:
        np.testing.assert_array_equal(a.pieces[piece], b.pieces[piece])
    assert Asi(eps=0.9).state() == {}
    asi.restore({})  # the state before the first step (a dry run is undone so)
    assert asi.factors is None and asi.k1 is None


def test_asi_at_full_rank_reconstructs_exactly():
    """The backward is exact w.r.t. core x U's; at full ranks that is A itself."""
    rng = np.random.default_rng(3)
    asi = Asi(ranks=(6, 12, 5, 5))
    for x in drifting(rng, 3, (6, 12, 5, 5), (6, 4, 2, 2)):
        kept = asi(x)
    p = kept.pieces
    rebuilt = p["core"].astype(np.float64)
    for mode, u in enumerate((p["u_batch"], p["u_channel"], p["u_height"], p["u_width"])):
        rebuilt = np.moveaxis(np.moveaxis(rebuilt, mode, -1) @ u.T, -1, mode)
    np.testing.assert_allclose(rebuilt, x, atol=1e-4)


def test_a_subspace_step_unfolds_a_block_of_samples_not_the_input(monkeypatch):
    """A mode that is not multiplied in place (height, on a 28 x 28 map) is unfolded a block
    of samples at a time: numpy's peak stays under half of x, where unfolding x whole
    took more than x (measured 799 KB for this 602 KB x)."""
    import tracemalloc
    from actcomp_edge.core import decomposition
    x = np.random.default_rng(0).standard_normal((12, 16, 28, 28)).astype(np.float32)
    factors = [u.copy() for u in hosvd(x, ranks=(4, 5, 9, 7)).factors[1:]]
    monkeypatch.setattr(decomposition, "GROW_BLOCK_BYTES", x[:2].nbytes)
    tracemalloc.start()
    subspace_step(x, factors, 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 2


@pytest.mark.parametrize("shape,ranks", [((8, 24, 40, 40), (3, 5, 9, 7)),   # height in place
                                         ((6, 64, 5, 5), (2, 7, 2, 3)),     # channels > rest
                                         ((4, 3, 48, 48), (2, 1, 4, 3)),    # an RGB stem
                                         ((16, 8, 24, 24), (4, 8, 20, 20)),   # height unfolded
                                         ((12, 16, 28, 28), (4, 5, 9, 7)),    # in blocks
                                         ((64, 24, 56, 56), (8, 12, 40, 40)),  # P's Gram
                                         ((64, 32, 32, 32), (4, 32, 32, 32))])  # full ranks
def test_the_workspace_rows_bound_what_numpy_allocates(shape, ranks, monkeypatch):
    """hosvd and asi's workspace (the memory plan's numpy term) is at least tracemalloc's
    peak of the decomposition beyond x and what it keeps: the exact HOSVD at fixed ranks,
    then a subspace step warm-started from its factors (the last shape's in blocks of 2
    samples: its height mode unfolded per block)."""
    import tracemalloc
    from actcomp_edge.core import decomposition
    from actcomp_edge.core.decomposition import hosvd, subspace_step
    if shape[0] == 12:
        monkeypatch.setattr(decomposition, "GROW_BLOCK_BYTES", 2 * 4 * 16 * 28 * 28)
        assert decomposition.grow_samples(shape) == 2
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    factors = [u.copy() for u in hosvd(x, ranks=ranks).factors[1:]]
    for name, decompose in (("hosvd", lambda: hosvd(x, ranks=ranks)),
                            ("asi", lambda: subspace_step(x, factors, ranks[0]))):
        tracemalloc.start()
        t = decompose()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert METHODS[name].workspace(shape, ranks, 1) + 4 * t.kept_floats >= peak, name


def test_the_runner_takes_asi_subspace_steps_on_one_blas_thread(tmp_path, monkeypatch):
    """The first step (the exact HOSVD) on the runner's BLAS threads, each subspace step on
    one (runtime.Trainer.compress), and the runner's count back after it."""
    from threadpoolctl import ThreadpoolController
    from actcomp_edge.core import methods
    from export.training_graph import TrainConfig
    from export_helpers import batch, export, random_model
    blas = ThreadpoolController()
    if not blas.select(user_api="blas").lib_controllers:
        pytest.skip("numpy's BLAS is not one threadpoolctl controls")
    seen, step = [], methods.subspace_step

    def counting(*args):
        seen.append(blas.select(user_api="blas").info()[0]["num_threads"])
        return step(*args)
    monkeypatch.setattr(methods, "subspace_step", counting)
    spec, model = random_model("mcunet-in1", 3, calibration_hw=(64, 64))
    trainer = export(model, spec, tmp_path, TrainConfig(n_layers=3, method="asi", eps=0.8), 4,
                     (64, 64))
    images, labels = batch(4, (64, 64), 3)
    with blas.limit(limits=2, user_api="blas"):  # an earlier runner in this process may
        before = blas.select(user_api="blas").info()[0]["num_threads"]  # have set 1
        if before < 2:
            pytest.skip("BLAS takes one thread here: nothing to tell apart")
        for _ in range(2):
            trainer.step(images, labels, lr=0.01)
        after = blas.select(user_api="blas").info()[0]["num_threads"]
    assert seen == [1, 1, 1] and after == before
