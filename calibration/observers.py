"""Streaming observers: each sees batches of one tensor and reports a clipping range.

The protocol (after torch.ao's observers): `update(x)` folds a batch into bounded state,
`merge(other)` combines two observers of the same kind (used for tensors that share one
quantizer, e.g. concat inputs), `compute_range()` returns (lo, hi), scalars for a per-tensor
observer and 1-D arrays for a per-channel one (`axis` set).
"""

from __future__ import annotations

import numpy as np


class Observer:
    """Base class; subclasses own their statistics only."""

    method = ""

    def __init__(self, axis: int | None = None):
        self.axis = axis

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def merge(self, other: "Observer") -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _per_channel(self, x: np.ndarray) -> np.ndarray:
        """View `x` as [channels, elements] along `axis` (or [1, elements] per tensor)."""
        if self.axis is None:
            return x.reshape(1, -1)
        return np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)


class MinMaxObserver(Observer):
    """lo = min(x), hi = max(x) over everything seen (per channel when `axis` is set)."""

    method = "minmax"

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        flat = self._per_channel(x)
        lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def merge(self, other: "Observer") -> None:
        assert isinstance(other, MinMaxObserver)
        if other.lo is None:
            return
        self.lo = other.lo if self.lo is None else np.minimum(self.lo, other.lo)
        self.hi = other.hi if self.hi is None else np.maximum(self.hi, other.hi)

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None:
            raise ValueError("observer saw no data")
        if self.axis is None:
            return self.lo[0], self.hi[0]
        return self.lo, self.hi


OBSERVERS: dict[str, type[Observer]] = {cls.method: cls for cls in (MinMaxObserver,)}


def make_observer(method: str, axis: int | None = None) -> Observer:
    try:
        return OBSERVERS[method](axis)
    except KeyError:
        from qpasses.errors import InputError

        raise InputError(f"unknown calibration method {method!r}; choose from {', '.join(OBSERVERS)}") from None
