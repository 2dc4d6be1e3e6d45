"""Calibration data readers: stream model-input batches from .npy/.npz files (images: images.py).

Every array has a leading sample axis: an array for input `x` of shape [N, 3, 32, 32] holds 32x32
samples for a model input of shape [B, 3, 32, 32]. An array with one axis more than its input holds
whole feeds instead (for inputs without a leading batch axis: a scalar `sr` as [N], a recurrent state
[2, B, 128] as [N, 2, 1, 128]); a model with such an input is run one sample at a time. A `.npy` file feeds a single-input model; a
`.npz` file names its arrays after the model inputs (other keys, such as `labels`, are kept for
evaluation). A directory is read file by file in name order. `.npy` files are memory-mapped, so a
large calibration set is never loaded at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from qpasses.errors import CalibrationError, InputError


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # the model's shape; dim 0 is the batch (int or a name when dynamic)
    dtype: np.dtype


class DataSource(Protocol):
    """What calibration needs from a data reader: a sample count, subsets and batches of feeds."""

    one_per_feed: bool  # True: every sample is a whole feed, run one at a time
    def __len__(self) -> int: ...
    def split(self, holdout: int) -> tuple["DataSource", "DataSource"]: ...
    def batch_labels(self) -> np.ndarray | None: ...
    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]: ...
    def sample_shapes(self) -> dict[str, set[tuple[int, ...]]]: ...  # per input, the sample shapes it holds


class RowSelection:
    """Shared bookkeeping of the sources: the samples used are `rows`, in order."""

    rows: np.ndarray
    labels: np.ndarray | None
    one_per_feed = False

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, rows: np.ndarray):
        return dataclasses.replace(self, rows=self.rows[rows])

    def split(self, holdout: int):
        """The first samples for calibration, the last `holdout` held back for evaluation."""
        n = len(self) - holdout
        return self.subset(np.arange(0, n)), self.subset(np.arange(n, len(self)))

    def batch_labels(self) -> np.ndarray | None:
        return None if self.labels is None else self.labels[self.rows]

    def batch_rows(self, batch_size: int, limit: int | None) -> Iterator[np.ndarray]:
        rows = self.rows if limit is None else self.rows[:limit]
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]


@dataclass
class ArraySource(RowSelection):
    """Samples from arrays keyed by input name."""

    arrays: dict[str, list[np.ndarray]]  # per input: chunks of [n_i, ...] in file order
    labels: np.ndarray | None = None
    origin: str = ""
    rows: np.ndarray = field(default=None)  # type: ignore[assignment]
    whole: frozenset[str] = frozenset()  # inputs whose samples are whole feeds (see the module docstring)

    def __post_init__(self) -> None:
        if self.rows is None:
            first = next(iter(self.arrays.values()), [])
            self.rows = np.arange(sum(chunk.shape[0] for chunk in first))

    @property
    def one_per_feed(self) -> bool:  # type: ignore[override]
        return bool(self.whole)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for take in self.batch_rows(1 if self.whole else batch_size, limit):
            yield {name: np.asarray(_gather(chunks, take)[0]) if name in self.whole else _gather(chunks, take)
                   for name, chunks in self.arrays.items()}

    def sample_shapes(self) -> dict[str, set[tuple[int, ...]]]:
        """Per input, the sample shapes its arrays hold (one, unless files disagree)."""
        return {name: {tuple(c.shape[1:]) for c in chunks} for name, chunks in self.arrays.items()}


def _gather(chunks: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    if len(chunks) == 1:
        return np.ascontiguousarray(chunks[0][rows])
    bounds = np.cumsum([0] + [c.shape[0] for c in chunks])
    parts = []
    for r in rows:
        i = int(np.searchsorted(bounds, r, side="right") - 1)
        parts.append(chunks[i][r - bounds[i]])
    return np.stack(parts)


RANDOM_WARNING = ("WARNING: calibrating on random data (--data random): this is a smoke test, not calibration; "
                  "the ranges say nothing about real inputs")


RANDOM_MAX_SAMPLES = 4096  # a smoke test needs a few; this many is already far beyond one
RANDOM_LIMIT = 4 << 30  # bytes of noise `random:N` may make


def random_source(spec: str, inputs: list[InputSpec], seed: int) -> ArraySource:
    """`random` or `random:N`: N (default 32) standard-normal samples per input, for smoke tests only."""
    _, _, count = spec.partition(":")
    try:
        n = int(count) if count else 32
        if not 0 < n <= RANDOM_MAX_SAMPLES:
            raise ValueError
    except ValueError:
        raise InputError(f"--data {spec}: expected random or random:N with 0 < N <= {RANDOM_MAX_SAMPLES}") from None
    rng = np.random.default_rng(seed)
    arrays = {}
    for s in inputs:
        if not np.issubdtype(s.dtype, np.floating) or any(not isinstance(d, int) for d in s.shape[1:]):
            raise InputError(f"--data random needs static float inputs; {s.name} is {s.dtype} {list(s.shape)}")
    size = n * sum(int(np.prod(s.shape[1:])) * np.dtype(s.dtype).itemsize for s in inputs)
    if size > RANDOM_LIMIT:
        raise InputError(f"--data {spec}: {n} random samples would take {size / 2**30:.3g} GiB; "
                         f"a smoke test needs a few (random:32)")
    for s in inputs:
        arrays[s.name] = [rng.standard_normal((n, *s.shape[1:])).astype(s.dtype)]
    return ArraySource(arrays, origin="random")


def is_random(path: str | Path | None) -> bool:
    """`--data random` or `random:N`: seeded noise, a smoke test rather than calibration."""
    return path is not None and (str(path) == "random" or str(path).startswith("random:"))


def open_source(path: str | Path, inputs: list[InputSpec], preprocess: Path | None = None, seed: int = 0) -> DataSource:
    """Read `path` (a .npy/.npz file, a directory of them, or of images) and check it against the model inputs."""
    if is_random(path):
        return random_source(str(path), inputs, seed)
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            from .images import IMAGE_SUFFIXES, open_images

            if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
                return open_images(path, inputs, preprocess)
            raise CalibrationError(f"{path}: no .npy, .npz or image files in this directory")
    elif path.is_file():
        if path.suffix not in (".npy", ".npz"):
            raise InputError(f"{path}: calibration data must be .npy, .npz or a directory of them")
        files = [path]
    else:
        raise InputError(f"{path}: no such file or directory")
    arrays: dict[str, list[np.ndarray]] = {spec.name: [] for spec in inputs}
    labels = []
    for file in files:
        for name, array in _read(file, inputs).items():
            if name == "labels":
                labels.append(np.asarray(array))
            else:
                arrays[name].append(array)
    ranks = {spec.name: len(spec.shape) for spec in inputs}
    whole = frozenset(name for name, chunks in arrays.items() if chunks and chunks[0].ndim == ranks[name] + 1)
    mixed = [name for name, chunks in arrays.items() if len({c.ndim for c in chunks}) > 1]
    if mixed:
        raise CalibrationError(f"{path}: the files give input {mixed[0]} arrays of different ranks")
    counts = {name: sum(a.shape[0] for a in chunks) for name, chunks in arrays.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{path}: inputs have different sample counts: "
                               + ", ".join(f"{k}={v}" for k, v in counts.items()))
    n = next(iter(counts.values()), 0)
    if n == 0:
        raise CalibrationError(f"{path}: calibration data is empty (0 samples)")
    label_array = np.concatenate(labels) if labels else None
    if label_array is not None and len(label_array) != n:
        raise CalibrationError(f"{path}: {len(label_array)} labels for {n} samples")
    return ArraySource(arrays, label_array, str(path), whole=whole)


def _read(file: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if file.suffix == ".npy":
            if len(inputs) != 1:
                raise CalibrationError(f"{file}: a .npy file feeds a single-input model; this model has inputs "
                                       f"{', '.join(s.name for s in inputs)}: use a .npz keyed by input name")
            found = {inputs[0].name: np.load(file, mmap_mode="r", allow_pickle=False)}
        else:
            with np.load(file, allow_pickle=False) as npz:
                found = {k: npz[k] for k in npz.files}
    except CalibrationError:
        raise
    except Exception as exc:
        raise InputError(f"{file}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    missing = [s.name for s in inputs if s.name not in found]
    if missing:
        raise CalibrationError(f"{file}: no array for model input(s) {', '.join(missing)} (found: {', '.join(sorted(found)) or 'none'})")
    out = {"labels": _labels(file, found["labels"])} if "labels" in found else {}
    for spec in inputs:
        out[spec.name] = _check(file, spec, found[spec.name])
    return out


def _labels(file: Path, labels: np.ndarray) -> np.ndarray:
    """Class indices: one non-negative integer per sample (a NaN label would match no prediction)."""
    whole = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if labels.ndim != 1 or not whole or (labels < 0).any():
        raise CalibrationError(f"{file}: labels must be one class index (an integer >= 0) per sample, "
                               f"got {labels.dtype} {list(labels.shape)}")
    return labels.astype(np.int64)


def _check(file: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    want = tuple(spec.shape)
    # [N, *shape[1:]] (the batch axis holds the samples) or [N, *shape] (whole feeds)
    fixed = want if array.ndim == len(want) + 1 else want[1:] if array.ndim == len(want) > 0 else None
    if fixed is None or any(isinstance(d, int) and d > 0 and d != a for d, a in zip(fixed, array.shape[1:])):
        raise CalibrationError(f"{file}: array {spec.name} has shape {list(array.shape)}, expected "
                               f"[N, {', '.join(str(d) for d in want[1:])}] (or [N, {', '.join(str(d) for d in want)}], "
                               f"whole feeds) for model input {spec.name} {list(want)}")
    if array.dtype != spec.dtype:
        if not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)):
            raise CalibrationError(f"{file}: array {spec.name} is {array.dtype}, model input {spec.name} is {spec.dtype}")
        array = array.astype(spec.dtype)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise CalibrationError(f"{file}: array {spec.name} contains NaN or Inf")
    return array
