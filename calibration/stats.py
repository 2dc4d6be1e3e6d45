"""Streaming statistics that are not range setters: per-channel moments and tensor summaries.

They follow the observers' `update(x)` protocol, so `runner.observe` can feed them; they are what
bias correction, BatchNorm re-calibration, SmoothQuant and `qpass analyze` measure.
"""

from __future__ import annotations

import numpy as np


class Batches:
    """Keeps every batch of one tensor, for the passes that optimise on a layer's real inputs."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.parts.append(x)


class ChannelMoments:
    """Per-channel mean and variance over every axis but 1 (the NCHW / NC channel axis)."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        axes = tuple(i for i in range(x.ndim) if i != 1)
        x = x.astype(np.float64)
        s, sq = x.sum(axis=axes), np.square(x).sum(axis=axes)
        self.total = s if self.total is None else self.total + s
        self.squares = sq if self.squares is None else self.squares + sq
        self.count += x.size // x.shape[1]

    def mean(self) -> np.ndarray:
        return self.total / self.count

    def var(self) -> np.ndarray:
        return np.maximum(self.squares / self.count - np.square(self.mean()), 0.0)


class ChannelAbsMax:
    """Per-channel max |x| over every axis but the last (a transformer's [tokens, channels])."""

    def __init__(self):
        self.maximum: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        m = np.abs(x.astype(np.float64)).reshape(-1, x.shape[-1]).max(axis=0)
        self.maximum = m if self.maximum is None else np.maximum(self.maximum, m)


class TensorSummary:
    """Min, max, mean, std of a tensor and the fraction of values outside a quantizer's range."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.min, self.max = np.inf, -np.inf
        self.total = self.squares = 0.0
        self.count = self.outside = 0

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.total += float(x.sum())
        self.squares += float(np.square(x).sum())
        self.count += x.size
        self.outside += int(np.count_nonzero((x < self.lo) | (x > self.hi)))

    def as_dict(self) -> dict[str, float]:
        mean = self.total / self.count
        return {"min": self.min, "max": self.max, "mean": mean,
                "std": float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0))),
                "clipped_fraction": self.outside / self.count}
