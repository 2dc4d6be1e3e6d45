"""Observers against plain numpy implementations of MQBench app. C.1 on the full data."""

from __future__ import annotations

import numpy as np
import pytest

from qpasses.calibration.observers import HistogramObserver, KLObserver, as_method, kl_best_bin, make_observer
from qpasses.errors import InputError
from qpasses.targets.schema import Quantizer

SYM = Quantizer(signed=True, symmetric=True)
ASYM = Quantizer(signed=False, symmetric=False)
PER_CHANNEL = Quantizer(signed=True, symmetric=True, granularity="per_channel")


def data(seed: int = 0) -> np.ndarray:
    """Skewed, heavy-tailed activations: what makes the methods differ."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=(64, 8, 16, 16)) * 0.7 + 0.3).astype(np.float32)


def stream(method: str, x: np.ndarray, batch: int, axis: int | None = None, **options):
    if method == "quantile":
        options.setdefault("q", 0.999)  # 1e-3 of these samples is still a populated tail
    obs = make_observer(method, axis, **options)
    for start in range(0, len(x), batch):
        obs.update(x[start:start + batch])
    return obs


def fake_quant(x: np.ndarray, lo: float, hi: float, q: Quantizer) -> np.ndarray:
    """Reference fake quantization for a range, written from the formula."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if q.symmetric:
        qmin, qmax = -128, 127
        s, z = max(-lo, hi) / 127, 0
    else:
        qmin, qmax = 0, 255
        s = (hi - lo) / 255
        z = np.clip(np.round(-lo / s), 0, 255)
    return (np.clip(np.rint(x / s) + z, qmin, qmax) - z) * s


# --- the references, on all data at once -------------------------------------------------------

def ref_minmax(x, q):
    return x.min(), x.max()


def ref_meanstd(x, q, k=3.0):
    mu, sd = x.astype(np.float64).mean(), x.astype(np.float64).std()
    if q.symmetric:
        amax = max(abs(mu - k * sd), abs(mu + k * sd))
        return max(-amax, x.min()), min(amax, x.max())
    return max(mu - k * sd, x.min()), min(mu + k * sd, x.max())


def ref_norm(x, q):
    rms = np.sqrt(np.mean(np.square(x.astype(np.float64))))
    if q.symmetric:
        s = 2 * rms / np.sqrt(127)
        return max(-s * 127, x.min()), min(s * 127, x.max())
    s = 2 * rms / np.sqrt(255)  # uint8: qmax = 255; signed data -> a window centred on 0
    return max(-s * 127.5, x.min()), min(s * 127.5, x.max())


def ref_quantile(x, q, level=0.999):
    if q.symmetric:
        amax = np.quantile(np.abs(x), level)
        return max(-amax, x.min()), min(amax, x.max())
    return np.quantile(x, 1 - level), np.quantile(x, level)


def ref_mse(x, q):
    best, best_range = np.inf, None
    amax = max(abs(x.min()), abs(x.max()))
    for i in range(95):
        f = 1 - 0.01 * i
        lo, hi = (-amax * f, amax * f) if q.symmetric else (x.min() * f, x.max() * f)
        err = np.sum((fake_quant(x, lo, hi, q) - x) ** 2)
        if err < best:
            best, best_range = err, (max(lo, x.min()), min(hi, x.max()))
    return best_range


def ref_kl_threshold(x, levels=128, bins=2048):
    """TensorRT entropy calibration, written as a plain loop over candidates and bins (with the
    zero-bin treatment of NVIDIA's calibrator and the 1% clipping guard qpass documents)."""
    amax = np.abs(x).max()
    hist, _ = np.histogram(np.abs(x), bins=bins, range=(0, amax))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        group = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start, stop = j * group, (i if j == levels - 1 else (j + 1) * group)
            nonzero = hist[start:stop] > 0
            if nonzero.any():
                q[start:stop][nonzero] = hist[start:stop].sum() / nonzero.sum()
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)) or hist[i:].sum() > 0.01 * hist.sum():
            continue
        kl = np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0]))
        if kl < best:
            best, best_i = kl, i
    return min((best_i + 0.5) * amax / bins, amax)


REFERENCES = {"minmax": ref_minmax, "meanstd": ref_meanstd, "norm": ref_norm, "quantile": ref_quantile, "mse": ref_mse}
# Tolerances, as a fraction of the data's span: exact statistics for minmax, meanstd and norm;
# quantile differs from the full-data reference by its histogram's resolution (4096 bins, uniform
# within a bin); MSE, whose optimum is flat, must reach the reference's error within 1%.
TOLERANCE = {"minmax": 1e-6, "meanstd": 1e-6, "norm": 1e-6, "quantile": 5e-3}


def assert_close(method, x, lo, hi, ref_lo, ref_hi, quantizer):
    if method == "mse":  # a flat optimum: compare the error reached, not where it is reached
        err, ref_err = (np.sum((fake_quant(x, a, b, quantizer) - x) ** 2) for a, b in ((lo, hi), (ref_lo, ref_hi)))
        assert err <= 1.01 * ref_err
        return
    span = float(x.max() - x.min())
    assert abs(lo - ref_lo) <= TOLERANCE[method] * span and abs(hi - ref_hi) <= TOLERANCE[method] * span


@pytest.mark.parametrize("quantizer", [SYM, ASYM], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_per_tensor_against_reference(method, quantizer):
    x = data()
    lo, hi = stream(method, x, batch=5).compute_range(quantizer)
    assert_close(method, x, lo, hi, *REFERENCES[method](x, quantizer), quantizer)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_per_channel_against_reference(method):
    x = data(1)
    lo, hi = stream(method, x, batch=7, axis=1).compute_range(PER_CHANNEL)
    for c in range(x.shape[1]):
        assert_close(method, x[:, c], lo[c], hi[c], *REFERENCES[method](x[:, c], PER_CHANNEL), PER_CHANNEL)


def test_kl_closed_form_equals_the_plain_loop():
    x = data(2)
    amax = np.abs(x).max()
    hist = np.histogram(np.abs(x), bins=2048, range=(0, amax))[0].astype(np.float64)
    hist[0] = hist[1]
    assert (kl_best_bin(hist, 128) + 0.5) * amax / 2048 == pytest.approx(ref_kl_threshold(x), rel=1e-12)


def test_kl_never_clips_most_of_a_discrete_distribution():
    """17 pixel levels with most mass at |x| = 1: plain KL would clip at the first level."""
    x = np.random.default_rng(0).choice(np.linspace(-1, 1, 17), size=20_000, p=[0.7] + [0.3 / 16] * 16).astype(np.float32)
    lo, hi = stream("kl", x, 1000).compute_range(SYM)
    assert np.mean(np.abs(x) > hi) <= 0.01


def test_kl_observer_against_tensorrt_reference():
    x = data(3)
    lo, hi = stream("kl", x, batch=4).compute_range(SYM)
    threshold = ref_kl_threshold(x)
    assert hi == pytest.approx(threshold, abs=float(0.01 * np.abs(x).max())) and lo == -hi
    assert hi < np.abs(x).max() * 0.9  # a real search: heavy tails are clipped, unlike MinMax


@pytest.mark.parametrize("method", ["minmax", "meanstd", "norm", "quantile", "mse", "kl"])
def test_streaming_equals_one_shot_and_is_deterministic(method):
    x = data(4)
    ranges = [stream(method, x, batch).compute_range(SYM) for batch in (1, 7, 64)]
    span = float(x.max() - x.min())
    tol = {"kl": 1e-2, "mse": 2.5e-2, "quantile": 5e-3}.get(method, 1e-9)
    for lo, hi in ranges[1:]:
        assert abs(lo - ranges[0][0]) <= tol * span and abs(hi - ranges[0][1]) <= tol * span
    assert stream(method, x, 7).compute_range(SYM) == ranges[1]


@pytest.mark.parametrize("method", ["minmax", "meanstd", "norm", "quantile", "mse", "kl"])
def test_merge_equals_observing_both(method):
    x = data(5)
    a, b = stream(method, x[:32], 4), stream(method, x[32:], 4)
    a.merge(b)
    lo, hi = a.compute_range(ASYM)
    ref_lo, ref_hi = stream(method, x, 4).compute_range(ASYM)
    span = float(x.max() - x.min())
    assert abs(lo - ref_lo) <= 3e-2 * span and abs(hi - ref_hi) <= 3e-2 * span


@pytest.mark.parametrize("method", ["minmax", "quantile", "mse", "kl"])
def test_one_histogram_serves_each_method(method):
    """--calib best observes once: the method's range from a shared histogram is the range of the
    method's own observer on the same batches (the same statistics, so exactly)."""
    x = data(7)
    shared = HistogramObserver()
    for start in range(0, len(x), 8):
        shared.update(x[start:start + 8])
    for quantizer in (SYM, ASYM):
        assert as_method(shared, method, q=0.999).compute_range(quantizer) == \
            stream(method, x, 8).compute_range(quantizer)
    with pytest.raises(ValueError, match="needs statistics"):
        as_method(shared, "meanstd")


def test_options_and_bad_values():
    x = data(6)
    wide = stream("quantile", x, 8, q=1.0).compute_range(SYM)
    narrow = stream("quantile", x, 8, q=0.99).compute_range(SYM)
    assert narrow[1] < wide[1]
    assert stream("meanstd", x, 8, k=1.0).compute_range(SYM)[1] < stream("meanstd", x, 8).compute_range(SYM)[1]
    with pytest.raises(InputError, match="quantile must be in"):
        make_observer("quantile", q=1.5)
    with pytest.raises(InputError, match="unknown calibration method 'median'"):
        make_observer("median")
    assert isinstance(make_observer("kl"), KLObserver)


def test_memory_is_bounded_by_bins_not_samples():
    obs = make_observer("kl")
    for seed in range(40):
        obs.update(np.random.default_rng(seed).standard_normal(50_000).astype(np.float32) * (1 + seed / 10))
    assert obs.hist.counts.size == 4096 and obs.hist.counts.sum() == 40 * 50_000
