"""A streaming, mergeable histogram with bounded memory, per tensor or per channel.

Bins lie on a lattice anchored at zero: bin m covers [m*w, (m+1)*w), and `bins` consecutive bins
starting at `first` are kept. When a batch falls outside the kept range, the width doubles as often
as needed (w' = 2^k w) and old bin m folds exactly into new bin floor(m / 2^k), so growing the range
loses no counts and adds no smoothing; memory stays `channels x bins` however much data streams by
(unlike ONNX Runtime's histogram calibrators, which keep every batch). Because 0 is always a bin
edge, the histogram of |x| is an exact fold of the signed one.
"""

from __future__ import annotations

import numpy as np


class Histogram:
    def __init__(self, channels: int, bins: int = 4096):
        self.bins = bins
        self.counts = np.zeros((channels, bins), dtype=np.float64)
        self.width = np.zeros(channels)  # 0 until the first batch
        self.first = np.zeros(channels, dtype=np.int64)

    @property
    def channels(self) -> int:
        return self.counts.shape[0]

    def update(self, flat: np.ndarray) -> None:
        """Add values given as [channels, n]."""
        lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        for c in np.flatnonzero(self.width == 0):
            span = max(hi[c] - lo[c], abs(hi[c]), abs(lo[c]), 1e-30)
            self.width[c] = span / (self.bins - 2)
            self.first[c] = int(np.floor(lo[c] / self.width[c]))
        for c in range(self.channels):
            self._grow(c, lo[c], hi[c])
        idx = np.floor(flat / self.width[:, None]).astype(np.int64) - self.first[:, None]
        np.clip(idx, 0, self.bins - 1, out=idx)  # only float rounding at the very edge can step outside
        idx += (np.arange(self.channels) * self.bins)[:, None]
        self.counts += np.bincount(idx.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def _grow(self, c: int, lo: float, hi: float) -> None:
        w, first = self.width[c], int(self.first[c])
        if int(np.floor(lo / w)) >= first and int(np.floor(hi / w)) < first + self.bins:
            return
        occupied = np.flatnonzero(self.counts[c])
        occ_lo, occ_hi = (first + occupied[0], first + occupied[-1]) if occupied.size else (np.inf, -np.inf)
        k = 0
        while True:  # the smallest doubling that holds the occupied bins and the new values
            need_lo = int(min(occ_lo // 2**k, np.floor(lo / (w * 2**k))))
            need_hi = int(max(occ_hi // 2**k, np.floor(hi / (w * 2**k))))
            if need_hi - need_lo < self.bins:
                break
            k += 1
        start = need_lo - (self.bins - (need_hi - need_lo + 1)) // 2  # centre the free bins
        old = self.counts[c].copy()
        self.counts[c] = 0.0
        np.add.at(self.counts[c], (first + occupied) // 2**k - start, old[occupied])
        self.width[c], self.first[c] = w * 2**k, start

    def edges(self, c: int) -> np.ndarray:
        return (self.first[c] + np.arange(self.bins + 1)) * self.width[c]

    def quantile(self, c: int, q: float) -> float:
        cum = np.concatenate([[0.0], np.cumsum(self.counts[c])])
        return float(np.interp(q * cum[-1], cum, self.edges(c)))

    def abs_counts(self, c: int) -> tuple[np.ndarray, float]:
        """Histogram of |x| on bins [m*w, (m+1)*w), m >= 0: the exact fold of the signed bins."""
        m = self.first[c] + np.arange(self.bins)
        folded = np.where(m >= 0, m, -m - 1)
        out = np.zeros(int(folded.max()) + 1)
        np.add.at(out, folded, self.counts[c])
        return out, float(self.width[c])

    def merge(self, other: "Histogram") -> None:
        """Add another histogram of the same channels, both resampled onto a lattice covering both."""
        for c in range(self.channels):
            if other.width[c] == 0:
                continue
            if self.width[c] == 0:
                self.counts[c], self.width[c], self.first[c] = other.counts[c], other.width[c], other.first[c]
                continue
            lo = min(self.edges(c)[0], other.edges(c)[0])
            hi = max(self.edges(c)[-1], other.edges(c)[-1])
            width = (hi - lo) / (self.bins - 2)
            first = int(np.floor(lo / width))
            edges = (first + np.arange(self.bins + 1)) * width
            merged = resample(self.counts[c], self.edges(c), edges) + resample(other.counts[c], other.edges(c), edges)
            self.counts[c], self.width[c], self.first[c] = merged, width, first


def resample(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts moved onto other bins, spreading each old bin's count uniformly over its width."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(new_edges, edges, cum))
