"""How close a candidate model's outputs are to a reference's on the same samples, and the gates on it.

`qpass eval` compares any two ONNX models with the same inputs and outputs; `qpass quantize` uses
the same comparison for its `--min-sqnr` / `--max-drop` gates. The reference runs with ONNX
Runtime's optimisations, the candidate op by op (optimisations off), so a Q/DQ candidate is
measured as its graph defines it, not as one engine's fused kernels round it.

Top-1 (when the first output is [N, classes]): accuracy against the data's `labels` when it has
them, else agreement with the reference's top-1; the drop is reference minus candidate, in points.
With `--metric`, the user's task metric of the candidate against the reference too (metric.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from qpasses.calibration.data import DataSource
from qpasses.calibration.runner import run_outputs
from qpasses.errors import InputError

from .metric import TaskMetric
from .pipeline import sqnr
from .report import json_safe


@dataclass
class Fidelity:
    samples: int
    sqnr_db: dict[str, float]  # per output
    metric: str | None  # what top-1 means here; None when the first output is not [N, classes]
    reference_top1: float | None  # percent
    candidate_top1: float | None
    agreement: float | None  # percent of samples where both models pick the same class
    task_metric: float | None = None  # the --metric function's value
    task_metric_name: str | None = None  # its FILE.py:FUNCTION

    @property
    def worst_sqnr_db(self) -> float:
        return min(self.sqnr_db.values())

    @property
    def drop(self) -> float | None:
        """Top-1 points lost by the candidate."""
        if self.reference_top1 is None or self.candidate_top1 is None:
            return None
        return self.reference_top1 - self.candidate_top1

    def failures(self, min_sqnr: float | None, max_drop: float | None, min_metric: float | None = None) -> list[str]:
        """One line per gate that does not hold."""
        failed = []
        if min_metric is not None and self.task_metric is not None and not self.task_metric >= min_metric:
            failed.append(f"task metric {self.task_metric:.4g} < --min-metric {min_metric:g} ({self.task_metric_name})")
        if min_sqnr is not None and not self.worst_sqnr_db >= min_sqnr:
            failed.append(f"worst output SQNR {self.worst_sqnr_db:.2f} dB < --min-sqnr {min_sqnr:g}")
        if max_drop is not None and self.drop is not None and not self.drop <= max_drop:
            failed.append(f"top-1 drop {self.drop:.2f} points > --max-drop {max_drop:g} ({self.metric})")
        return failed

    def to_json(self) -> dict:
        return json_safe({**asdict(self), "worst_sqnr_db": self.worst_sqnr_db, "drop": self.drop})


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: DataSource, batch_size: int,
            metric: TaskMetric | None = None) -> Fidelity:
    """Run both models on `data` and score the candidate's outputs against the reference's."""
    names = [o.name for o in reference.graph.output]
    if [o.name for o in candidate.graph.output] != names:
        raise InputError(f"the models' outputs differ: {names} vs {[o.name for o in candidate.graph.output]}")
    want = run_outputs(reference, data, batch_size)
    got = run_outputs(candidate, data, batch_size, optimize=False)
    if not want:
        raise InputError("no samples to compare on")
    for name, w, g in zip(names, want, got):
        if w.shape != g.shape:
            raise InputError(f"output {name} has shape {list(w.shape)} in the reference but {list(g.shape)}")
    fidelity = Fidelity(len(want[0]), {n: sqnr(w, g) for n, w, g in zip(names, want, got)}, None, None, None, None)
    if want[0].ndim == 2 and want[0].shape[1] > 1:
        ref_class, cand_class = want[0].argmax(1), got[0].argmax(1)
        labels = data.batch_labels()
        truth = ref_class if labels is None else np.asarray(labels)[:len(ref_class)]
        fidelity.metric = "top-1 agreement with the reference" if labels is None else "top-1 accuracy vs labels"
        fidelity.reference_top1 = 100.0 * float(np.mean(ref_class == truth))
        fidelity.candidate_top1 = 100.0 * float(np.mean(cand_class == truth))
        fidelity.agreement = 100.0 * float(np.mean(ref_class == cand_class))
    if metric is not None:
        fidelity.task_metric, fidelity.task_metric_name = metric(want, got), metric.spec
    return fidelity


def format_fidelity(fidelity: Fidelity) -> str:
    lines = [f"{fidelity.samples} samples"]
    lines += [f"  {name}: SQNR {db:.2f} dB" for name, db in fidelity.sqnr_db.items()]
    if fidelity.metric is not None:
        lines.append(f"  top-1 ({fidelity.metric}): reference {fidelity.reference_top1:.2f}%, "
                     f"candidate {fidelity.candidate_top1:.2f}% (drop {fidelity.drop:.2f} points), "
                     f"agreement {fidelity.agreement:.2f}%")
    if fidelity.task_metric is not None:
        lines.append(f"  task metric ({fidelity.task_metric_name}): {fidelity.task_metric:.4g}")
    return "\n".join(lines)
