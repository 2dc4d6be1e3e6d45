"""Streaming observers: the six range-setting methods of MQBench appendix C.1.

The protocol (after torch.ao's observers): `update(x)` folds a batch into bounded state, `merge`
combines two observers of one kind (tensors sharing a quantizer), and `compute_range(quantizer)`
returns the clipping range (lo, hi): scalars per tensor, 1-D arrays per channel (`axis` set).
`calibration.qparams` turns that range into scale and zero point, so every method serves every
scheme (symmetric or not, narrow range, power-of-two). With a symmetric quantizer the methods
choose a magnitude `amax` and the range is [-amax, amax] clipped to what was observed.

State is bounded: min/max and moments are a few numbers per channel, the histogram methods keep
one `Histogram` (4096 bins per channel) however many batches stream by.
"""

from __future__ import annotations

import numpy as np

from qpasses.errors import InputError
from qpasses.targets.schema import Quantizer

from .histogram import Histogram, resample
from .qparams import compute_qparams, is_signed


class Observer:
    """Base class: per-channel bookkeeping and min/max; subclasses add their statistics."""

    method = ""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def _per_channel(self, x: np.ndarray) -> np.ndarray:
        """View `x` as [channels, elements] along `axis` (or [1, elements] per tensor)."""
        if self.axis is None:
            return x.reshape(1, -1)
        return np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        flat = self._per_channel(np.asarray(x, dtype=np.float32))
        lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        self._update(flat)

    def _update(self, flat: np.ndarray) -> None:
        """Statistics beyond min/max; `flat` is [channels, elements]."""

    def merge(self, other: "Observer") -> None:
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi = other.lo.copy(), other.hi.copy()
        else:
            self.lo, self.hi = np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi)
        self._merge(other)

    def _merge(self, other: "Observer") -> None:
        pass

    def compute_range(self, quantizer: Quantizer) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None:
            raise ValueError("observer saw no data")
        lo, hi = self._range(quantizer)
        lo, hi = np.maximum(lo, self.lo), np.minimum(hi, self.hi)  # never beyond what was seen
        if self.axis is None:
            return lo[0], hi[0]
        return lo, hi

    def _range(self, quantizer: Quantizer) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """lo = min(x), hi = max(x) over all data; symmetric: amax = max(|min|, |max|)."""

    method = "minmax"

    def _range(self, quantizer):
        return self.lo, self.hi


class MeanStdObserver(Observer):
    """Range mean -/+ k * std (LSQ+ uses k = 3, DSQ 2.6); symmetric: amax = max(|mu - k s|, |mu + k s|).

    Streams sum, sum of squares and count per channel (float64), so std is the population std of
    all data seen.
    """

    method = "meanstd"

    def __init__(self, axis: int | None = None, k: float = 3.0):
        super().__init__(axis)
        self.k = k
        self.moments: np.ndarray | None = None  # [3, channels]: count, sum, sum of squares

    def _update(self, flat):
        f = flat.astype(np.float64)
        m = np.stack([np.full(len(f), f.shape[1], dtype=np.float64), f.sum(axis=1), np.square(f).sum(axis=1)])
        self.moments = m if self.moments is None else self.moments + m

    def _merge(self, other):
        self.moments = other.moments.copy() if self.moments is None else self.moments + other.moments

    def _range(self, quantizer):
        n, s, ss = self.moments
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
        lo, hi = mean - self.k * std, mean + self.k * std
        if quantizer.symmetric:
            amax = np.maximum(np.abs(lo), np.abs(hi))
            return -amax, amax
        return lo, hi


class NormObserver(Observer):
    """LSQ initialisation with a p-norm: scale = 2 * mean(|x|^p)^(1/p) / sqrt(qmax) (p = 2 default).

    The range follows from the scale: symmetric [-scale*qmax, scale*qmax]; asymmetric, the
    quantizer's (qmax - qmin) steps from 0 when the data is non-negative, else centred on 0.
    """

    method = "norm"

    def __init__(self, axis: int | None = None, p: float = 2.0):
        super().__init__(axis)
        self.p = p
        self.sums: np.ndarray | None = None  # [2, channels]: count, sum of |x|^p

    def _update(self, flat):
        f = np.abs(flat.astype(np.float64))
        s = np.stack([np.full(len(f), f.shape[1], dtype=np.float64), (f**self.p).sum(axis=1)])
        self.sums = s if self.sums is None else self.sums + s

    def _merge(self, other):
        self.sums = other.sums.copy() if self.sums is None else self.sums + other.sums

    def _range(self, quantizer):
        n, total = self.sums
        qmin, qmax = quantizer.qrange(is_signed(quantizer, self.lo))
        scale = 2.0 * (total / n) ** (1.0 / self.p) / np.sqrt(qmax)
        if quantizer.symmetric or qmin < 0:
            return -scale * qmax, scale * qmax
        steps = scale * (qmax - qmin)
        nonneg = self.lo >= 0
        return np.where(nonneg, 0.0, -steps / 2), np.where(nonneg, steps, steps / 2)


class HistogramObserver(Observer):
    """Base of the histogram methods: a `Histogram` per channel, created on the first batch."""

    def __init__(self, axis: int | None = None, bins: int = 4096):
        super().__init__(axis)
        self.bins = bins
        self.hist: Histogram | None = None

    def _update(self, flat):
        if self.hist is None:
            self.hist = Histogram(flat.shape[0], self.bins)
        self.hist.update(flat)

    def _merge(self, other):
        if self.hist is None:
            self.hist = Histogram(other.hist.channels, self.bins)
        self.hist.merge(other.hist)

    def _range(self, quantizer):
        ranges = [self._channel_range(c, quantizer) for c in range(self.hist.channels)]
        return np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])

    def _channel_range(self, c: int, quantizer: Quantizer) -> tuple[float, float]:
        raise NotImplementedError


class QuantileObserver(HistogramObserver):
    """Clip at the q-quantile (MQBench default q = 0.9999): asymmetric [Q(1 - q), Q(q)];
    symmetric amax = Q_|x|(q), the q-quantile of the magnitudes."""

    method = "quantile"

    def __init__(self, axis: int | None = None, q: float = 0.9999):
        super().__init__(axis)
        if not 0.0 < q <= 1.0:
            raise InputError(f"quantile must be in (0, 1], got {q}")
        self.q = q

    def _channel_range(self, c, quantizer):
        if quantizer.symmetric:
            counts, width = self.hist.abs_counts(c)
            cum = np.concatenate([[0.0], np.cumsum(counts)])
            amax = float(np.interp(self.q * cum[-1], cum, np.arange(len(counts) + 1) * width))
            return -amax, amax
        return self.hist.quantile(c, 1.0 - self.q), self.hist.quantile(c, self.q)


class MSEObserver(HistogramObserver):
    """The range minimising the expected squared quantization error over the data's histogram.

    Candidates shrink the observed range by f = 1 - 0.01 i, i = 0..94 (MQBench's search);
    each is turned into qparams by the target's quantizer (so power-of-two and narrow ranges are
    searched as deployed) and scored by sum_b n_b (x_b - fq(x_b))^2 over the histogram's bins
    (each bin sampled at 4 points, as its values spread over the bin's width).
    """

    method = "mse"
    factors = 1.0 - 0.01 * np.arange(95)

    def _channel_range(self, c, quantizer):
        counts = self.hist.counts[c]
        nz = np.flatnonzero(counts)
        # each non-empty bin is represented by 4 evenly spaced points sharing its count
        offsets = (np.arange(4) + 0.5) / 4
        centres = ((self.hist.first[c] + nz)[:, None] + offsets[None, :]).ravel() * self.hist.width[c]
        weights = np.repeat(counts[nz] / 4, 4)
        lo, hi = self.lo[c], self.hi[c]
        if quantizer.symmetric:
            amax = max(abs(lo), abs(hi))
            cand_lo, cand_hi = -amax * self.factors, amax * self.factors
            if not is_signed(quantizer, np.array(lo)):
                cand_lo = np.zeros_like(cand_hi)
        else:
            cand_lo, cand_hi = lo * self.factors, hi * self.factors
        qp = compute_qparams(cand_lo, cand_hi, quantizer)
        scale = qp.scale.astype(np.float64)[:, None]
        zp = qp.zero_point.astype(np.float64)[:, None]
        fq = (np.clip(np.rint(centres[None] / scale) + zp, qp.qmin, qp.qmax) - zp) * scale
        best = int(np.argmin(((fq - centres[None]) ** 2 * weights[None]).sum(axis=1)))
        return float(cand_lo[best]), float(cand_hi[best])


class KLObserver(HistogramObserver):
    """TensorRT's entropy calibration: the |x| threshold minimising KL(P || Q).

    The magnitudes' histogram is laid on 2048 bins over [0, max|x|], its first bin (the exact zeros
    a ReLU produces) set to its neighbour's count as NVIDIA's calibrator does. For each i in [L, 2048], P is
    the first i bins with the clipped tail added to bin i-1, Q the same i bins merged into L levels
    (L = 128 for int8, 256 for uint8 on non-negative data) and expanded back over the non-empty
    bins; the threshold is (i* + 0.5) * bin width for the i* of smallest KL(P || Q), among the
    candidates that clip at most 1% of the values (see `kl_best_bin`). Evaluated in
    closed form per merged level with prefix sums, so every candidate costs O(L), not O(i).
    """

    method = "kl"
    kl_bins = 2048

    def _channel_range(self, c, quantizer):
        lo, hi = float(self.lo[c]), float(self.hi[c])
        amax = max(abs(lo), abs(hi))
        if amax == 0.0:
            return 0.0, 0.0
        counts, width = self.hist.abs_counts(c)
        edges = np.arange(len(counts) + 1) * width
        hist = resample(counts, edges, np.linspace(0.0, amax, self.kl_bins + 1))
        hist[0] = hist[1]  # the spike of exact zeros (ReLU) would dominate P; NVIDIA's calibrator does the same
        levels = 2**quantizer.bits if (lo >= 0 and not is_signed(quantizer, np.array(lo))) else 2 ** (quantizer.bits - 1)
        threshold = (kl_best_bin(hist, levels) + 0.5) * amax / self.kl_bins
        threshold = min(threshold, amax)
        if quantizer.symmetric:
            return -threshold, threshold
        return max(lo, -threshold), min(hi, threshold)


def kl_best_bin(hist: np.ndarray, levels: int, max_clipped: float = 0.01) -> int:
    """The number of bins i in [levels, len(hist)] whose clipped distribution diverges least."""
    n = len(hist)
    cands = np.arange(levels, n + 1)
    cs = np.concatenate([[0.0], np.cumsum(hist)])
    nzc = np.concatenate([[0], np.cumsum(hist > 0)])
    hlogh = np.concatenate([[0.0], np.cumsum(np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1.0)), 0.0))])
    group = cands // levels  # bins per merged level; the last level takes the remainder
    starts = group[:, None] * np.arange(levels)[None, :]
    stops = np.concatenate([starts[:, 1:], cands[:, None]], axis=1)
    g_sum = cs[stops] - cs[starts]
    g_nz = nzc[stops] - nzc[starts]
    last = hist[cands - 1]
    outliers = cs[-1] - cs[cands]
    total = cs[-1]  # P sums to everything, Q to the kept bins
    kept = cs[cands]
    # sum_b P_b log P_b with the outliers folded into bin i-1
    last_new = last + outliers
    p_logp = (hlogh[cands] - np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
              + np.where(last_new > 0, last_new * np.log(np.where(last_new > 0, last_new, 1.0)), 0.0))
    # sum_b P_b log Q_b: Q_b is the level's mean over its non-empty bins, on non-empty bins only
    q_level = np.where(g_nz > 0, g_sum / np.maximum(g_nz, 1), 1.0)
    p_per_level = g_sum.copy()
    p_per_level[:, -1] += outliers
    p_logq = (p_per_level * np.log(q_level)).sum(axis=1)
    kl = (p_logp - p_logq) / total - np.log(total) + np.log(np.maximum(kept, 1e-300))
    kl = np.where((last == 0) & (outliers > 0), np.inf, kl)  # P > 0 where Q = 0
    # Guard: with few distinct values (e.g. 8x8 digit pixels) P and Q both pile the folded tail into
    # one bin and KL goes to 0 while most values are clipped; never clip more than `max_clipped`.
    kl = np.where(outliers > max_clipped * total, np.inf, kl)
    return int(cands[int(np.argmin(kl))]) if np.isfinite(kl).any() else n


OBSERVERS: dict[str, type[Observer]] = {
    cls.method: cls for cls in (MinMaxObserver, QuantileObserver, MSEObserver, KLObserver, NormObserver, MeanStdObserver)
}


def as_method(observer: HistogramObserver, method: str, **options) -> Observer:
    """An observer of `method` holding `observer`'s statistics: min/max and the histogram are all that
    minmax, quantile, mse and kl read, so one calibration pass serves each of them."""
    result = make_observer(method, observer.axis, **options)
    if not isinstance(result, (MinMaxObserver, HistogramObserver)):
        raise ValueError(f"{method} needs statistics a histogram does not keep")
    result.merge(observer)
    return result


def make_observer(method: str, axis: int | None = None, **options) -> Observer:
    """An observer by method name; `options` are the method's own (q for quantile, k for meanstd)."""
    try:
        cls = OBSERVERS[method]
    except KeyError:
        raise InputError(f"unknown calibration method {method!r}; choose from {', '.join(OBSERVERS)}") from None
    accepted = {"quantile": {"q"}, "meanstd": {"k"}, "norm": {"p"}}.get(method, set())
    return cls(axis, **{k: v for k, v in options.items() if k in accepted and v is not None})
