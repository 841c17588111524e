"""Deterministic, atomic, pickle-free .npz files."""
import numpy as np
import pytest

from actcomp_edge.core.npz import NpzError, load_npz, npz_bytes, save_npz


def test_round_trip_keeps_shapes_and_dtypes_including_scalars(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(7),
              "meta": np.array('{"a": 1}'), "t": np.arange(12.0).reshape(3, 4).T}
    save_npz(tmp_path / "a.npz", arrays)
    back = load_npz(tmp_path / "a.npz")
    for key, value in arrays.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)
    assert str(back["meta"]) == '{"a": 1}'


def test_same_arrays_same_bytes():
    arrays = {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.int64)}
    assert npz_bytes(arrays) == npz_bytes(dict(reversed(list(arrays.items()))))


def test_pickles_and_garbage_are_refused(tmp_path):
    np.savez(tmp_path / "p.npz", obj=np.array([{"x": 1}], dtype=object))
    with pytest.raises(NpzError, match="cannot read"):
        load_npz(tmp_path / "p.npz")
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(NpzError):
        load_npz(tmp_path / "g.npz")
