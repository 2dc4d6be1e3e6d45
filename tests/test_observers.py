"""Observers: streaming equals one-shot, per tensor and per channel."""

import numpy as np
import pytest

from qpasses.calibration.observers import MinMaxObserver, make_observer
from qpasses.errors import InputError


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_minmax_streaming_equals_one_shot(axis, batch):
    data = np.random.default_rng(0).standard_normal((16, 4, 5, 5)).astype(np.float32) * np.arange(1, 5)[None, :, None, None]
    obs = MinMaxObserver(axis)
    for start in range(0, len(data), batch):
        obs.update(data[start:start + batch])
    lo, hi = obs.compute_range()
    if axis is None:
        assert (lo, hi) == (data.min(), data.max())
    else:
        np.testing.assert_array_equal(lo, data.min(axis=(0, 2, 3)))
        np.testing.assert_array_equal(hi, data.max(axis=(0, 2, 3)))


def test_merge_covers_both():
    a, b = MinMaxObserver(), MinMaxObserver()
    a.update(np.array([-1.0, 2.0]))
    b.update(np.array([-3.0, 1.0]))
    a.merge(b)
    assert a.compute_range() == (-3.0, 2.0)


def test_unknown_method():
    with pytest.raises(InputError, match="unknown calibration method 'median'"):
        make_observer("median")
