"""Pass infrastructure: small named passes composed by `Sequential`, configured by a `PassContext`.

Modelled on TVM's `transform` (a pass is called on a module and returns it; a context carries
configuration and instruments) and onnx-ir's explicit contract (`requires` names the state a pass
needs; a failure is re-raised as an error naming the pass).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from .errors import PassError, QpassError

if TYPE_CHECKING:
    from qpasses.calibration.data import DataSource
    from qpasses.targets.schema import Target

    from .plan import QuantPlan



LOG = logging.getLogger(__name__)  # `qpass --verbose` shows it

@dataclass
class QuantState:
    """What the passes work on: the graph plus what earlier passes learned about it."""

    graph: gs.Graph
    target: "Target"
    plan: "QuantPlan | None" = None
    float_model: onnx.ModelProto | None = None  # the float graph the plan refers to (set by annotate)
    bn_records: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def snapshot(self) -> "QuantState":
        """A copy later passes cannot disturb (passes replace constant values, never edit them in place)."""
        return QuantState(self.graph.copy(), self.target, copy.deepcopy(self.plan), self.float_model,
                          copy.deepcopy(self.bn_records), list(self.notes))

    def model(self) -> onnx.ModelProto:
        """The current graph as a ModelProto (for ONNX Runtime and the checker)."""
        return gs.export_onnx(self.graph.copy(), do_type_check=False)


@dataclass
class PassContext:
    """Options and instruments shared by every pass of one run."""

    data: "DataSource | None" = None
    calib_method: str = "minmax"
    weight_calib: str = "minmax"
    calib_options: dict[str, float] = field(default_factory=dict)  # q (quantile), k (meanstd)
    batch_size: int = 16
    max_samples: int | None = None
    seed: int = 0
    float_layers: tuple[str, ...] = ()  # layers kept in float (mixed precision)
    encodings: dict | None = None  # an AIMET encodings file's content: qparams from it, no calibration
    quiet: bool = False
    debug: bool = False
    deadline: float | None = None  # time.perf_counter() value after which a learning pass stops early (--auto)
    timings: dict[str, float] = field(default_factory=dict)


    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


@dataclass
class PassResult:
    name: str
    modified: bool
    seconds: float


class Pass:
    """One graph transformation with one job. Subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        """Transform `state` in place; return whether anything changed."""
        raise NotImplementedError

    def __call__(self, state: QuantState, ctx: PassContext) -> PassResult:
        missing = [r for r in self.requires if getattr(state, r, None) is None]
        if missing:
            raise PassError(f"pass {self.name} needs {', '.join(missing)}, which no earlier pass produced")
        start = time.perf_counter()
        try:
            modified = self.run(state, ctx)
        except QpassError:
            raise
        except Exception as exc:
            raise PassError(f"pass {self.name} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        ctx.timings[self.name] = ctx.timings.get(self.name, 0.0) + seconds
        LOG.info("pass %s: %s in %.3f s", self.name, "modified the graph" if modified else "no change", seconds)
        return PassResult(self.name, bool(modified), seconds)


class Sequential:
    """Run passes in order; in debug mode check the graph after each one."""

    def __init__(self, passes: list[Pass]):
        self.passes = passes

    def __call__(self, state: QuantState, ctx: PassContext) -> list[PassResult]:
        results = []
        for p in self.passes:
            results.append(p(state, ctx))
            if ctx.debug:
                _validate(state, p.name)
        return results


def _validate(state: QuantState, pass_name: str) -> None:
    try:
        onnx.checker.check_model(state.model(), full_check=True)
    except Exception as exc:
        raise PassError(f"pass {pass_name} left an invalid graph: {str(exc).splitlines()[0]}") from exc
