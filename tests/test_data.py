"""Calibration data readers: shapes, dtypes, multiple inputs, bad files."""

import numpy as np
import pytest

from qpasses.calibration.data import InputSpec, open_source
from qpasses.errors import CalibrationError, InputError

SPEC = [InputSpec("x", ("N", 3, 4, 4), np.dtype(np.float32))]


def test_npy_directory_batches_in_file_order(tmp_path):
    a = np.arange(2 * 48, dtype=np.float32).reshape(2, 3, 4, 4)
    b = -np.arange(3 * 48, dtype=np.float32).reshape(3, 3, 4, 4)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    source = open_source(tmp_path, SPEC)
    assert len(source) == 5
    batches = [f["x"] for f in source.batches(2)]
    assert [len(x) for x in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate([a, b]))
    calib, held = source.split(2)
    np.testing.assert_array_equal(next(held.batches(8))["x"], b[1:])


def test_npz_with_two_inputs_and_labels(tmp_path):
    specs = [InputSpec("a", ("N", 2), np.dtype(np.float32)), InputSpec("b", ("N", 3), np.dtype(np.float32))]
    np.savez(tmp_path / "d.npz", a=np.ones((4, 2), np.float64), b=np.zeros((4, 3), np.float32), labels=np.arange(4))
    source = open_source(tmp_path / "d.npz", specs)
    feeds = next(source.batches(4))
    assert feeds["a"].dtype == np.float32 and set(feeds) == {"a", "b"}
    np.testing.assert_array_equal(source.batch_labels(), np.arange(4))


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 3, 4, 4), np.float32), "empty"),
    (np.zeros((2, 3, 5, 4), np.float32), "shape"),
    (np.zeros((2, 3, 4, 4), np.int32), "int32"),
    (np.full((2, 3, 4, 4), np.nan, np.float32), "NaN"),
])
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(CalibrationError, match=message):
        open_source(tmp_path / "x.npy", SPEC)


def test_missing_input_and_bad_paths(tmp_path):
    np.savez(tmp_path / "d.npz", y=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(CalibrationError, match="no array for model input"):
        open_source(tmp_path / "d.npz", SPEC)
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "none.npy", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .npy, .npz or image files"):
        open_source(tmp_path / "empty", SPEC)


def test_random_source_is_seeded_and_sized():
    from qpasses.calibration.data import random_source

    a, b = random_source("random:5", SPEC, seed=3), random_source("random:5", SPEC, seed=3)
    assert len(a) == 5 and a.origin == "random"
    np.testing.assert_array_equal(next(a.batches(5))["x"], next(b.batches(5))["x"])
    assert len(random_source("random", SPEC, seed=0)) == 32
    with pytest.raises(InputError, match="random:N"):
        random_source("random:zero", SPEC, seed=0)


def test_mixed_shapes_in_a_directory(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="b.npy: array x has shape"):
        open_source(tmp_path, SPEC)
