"""Ranges to qparams, against the formulas written out by hand."""

import numpy as np
import pytest

from qpasses.calibration.qparams import compute_qparams, quantize
from qpasses.targets.schema import Quantizer

SYM = Quantizer(signed=True, symmetric=True)
NARROW = Quantizer(signed=True, symmetric=True, narrow_range=True, granularity="per_channel")
ASYM_U8 = Quantizer(signed=False, symmetric=False)
POT = Quantizer(signed=True, symmetric=True, scale="pow2")


def test_symmetric_scale_is_amax_over_qmax():
    qp = compute_qparams(-2.0, 1.0, SYM)
    assert qp.scale == np.float32(2.0 / 127) and qp.zero_point == 0 and (qp.qmin, qp.qmax) == (-128, 127)
    assert qp.zero_point.dtype == np.int8


def test_asymmetric_uint8_maps_range_ends_and_zero_exactly():
    lo, hi = -1.0, 3.0
    qp = compute_qparams(lo, hi, ASYM_U8)
    assert qp.scale == np.float32(4.0 / 255) and qp.zero_point.dtype == np.uint8
    assert qp.zero_point == round(0 - lo / (4.0 / 255))
    q = quantize(np.array([lo, 0.0, hi], np.float32), qp)
    assert q.tolist() == [0, int(qp.zero_point), 255]


def test_range_is_widened_to_contain_zero():
    qp = compute_qparams(2.0, 6.0, ASYM_U8)
    assert qp.zero_point == 0 and qp.scale == np.float32(6.0 / 255)


def test_per_channel_narrow_range():
    lo, hi = np.array([-1.0, -0.5, 0.0]), np.array([0.5, 2.0, 0.0])
    qp = compute_qparams(lo, hi, NARROW, axis=0)
    np.testing.assert_array_equal(qp.scale, np.array([1 / 127, 2 / 127, 1.0], np.float32))  # zero channel -> 1
    assert (qp.qmin, qp.qmax) == (-127, 127) and qp.axis == 0
    w = np.array([[-1.0, 0.5], [-0.5, 2.0], [0.0, 0.0]], np.float32)
    q = quantize(w, qp)
    assert q.min() >= -127 and q.tolist() == [[-127, 64], [-32, 127], [0, 0]]


@pytest.mark.parametrize("amax", [0.3, 1.0, 5.7, 100.0])
def test_power_of_two_scale_covers_the_range(amax):
    qp = compute_qparams(-amax, amax, POT)
    k = np.log2(qp.scale)
    assert k == np.round(k)
    assert qp.scale * 127 >= amax and qp.scale / 2 * 127 < amax  # the smallest power of two that covers it


def test_adaptive_signedness():
    auto = Quantizer(signed="auto", symmetric=True)
    assert compute_qparams(0.0, 4.0, auto).qmin == 0
    assert compute_qparams(-1.0, 4.0, auto).qmin == -128
