"""A user's task metric (`--metric FILE.py:FUNCTION`): what the model's users measure, as a goal and a gate.

Output SQNR and top-1 are what qpass can measure on any model; a detector's users count the
detections kept, an OCR model's the texts read the same. FUNCTION(reference, candidate) gets, for
the same samples, the reference model's outputs and the candidate's (each a list of arrays in the
model's output order, samples along the first axis) and returns one number, higher is better
(e.g. the fraction of detections kept); `--min-metric` is the goal or gate on it. The file is
imported as a module, so it can import the user's own post-processing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError

MetricFunction = Callable[[list[np.ndarray], list[np.ndarray]], float]


@dataclass(frozen=True)
class TaskMetric:
    spec: str  # FILE.py:FUNCTION, as given
    function: MetricFunction

    def __call__(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        try:
            value = float(self.function(reference, candidate))
        except Exception as exc:  # the user's code: any failure is theirs to see, in one line
            raise InputError(f"--metric {self.spec} failed: {type(exc).__name__}: {exc}") from None
        if not math.isfinite(value):
            raise InputError(f"--metric {self.spec} returned {value}, not a finite number")
        return value


def load_metric(spec: str) -> TaskMetric:
    """The function named by FILE.py:FUNCTION; a clear error for a missing file, a file that does not
    import, or a name that is not a function."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise InputError(f"--metric takes FILE.py:FUNCTION, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--metric {spec}: no file {path}")
    module_name = "qpass_metric_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    loader = importlib.util.spec_from_file_location(module_name, file)
    if loader is None or loader.loader is None:
        raise InputError(f"--metric {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"--metric {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"--metric {spec}: {path} has no function {name}")
    return TaskMetric(spec, function)
