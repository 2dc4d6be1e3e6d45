"""Preoptimize: let the engine rewrite the float graph before Q/DQ is placed.

ONNX Runtime rewrites a float graph when it loads it (its "basic" level): constant folding, a Pad
or an Add/Mul by a constant folded into the Conv before it, MatMul + Add into Gemm, a YOLO "Focus"
stem (four strided Slices and a Concat) into SpaceToDepth + Gather. A Q/DQ pair between those ops
hides the pattern, so in a quantized model the rewrites no longer happen and the model runs ops
the float one does not. Running the engine's own rewrites first (what ORT's `quant_pre_process`
does) keeps them, whatever patterns the installed ORT version knows.

The result is normalised again (`graph.normalize`) and keeps the input's opset imports; the nodes
ORT leaves alone keep their names, a node it makes takes ORT's name. Initializers keep one reader
each (ORT's ConstantSharing is left out), since qpass quantizes a constant for the op that reads it. Run after fold-batchnorm, which records
the statistics it folds for BN re-calibration, and before equalize (a per-channel Mul folded into
its conv leaves conv pairs that equalize can scale) and decompose.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_graphsurgeon as gs

from qpasses import graph as graph_io
from qpasses.calibration.runner import optimized
from qpasses.pass_infra import Pass, PassContext, QuantState

KEPT_OUT = ("ConstantSharing",)


class Preoptimize(Pass):
    name = "preoptimize"
    summary = "apply the engine's own float graph rewrites, which Q/DQ would block"

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        model = state.model()
        level = state.target.fusion.preoptimize if state.target.fusion else ""
        rewritten = optimized(model, level, disabled=KEPT_OUT)
        before = _signature(model)
        result = onnx.ModelProto()
        result.CopyFrom(model)
        result.graph.CopyFrom(rewritten.graph)
        if any(n.domain not in ("", "ai.onnx") for n in result.graph.node):
            state.notes.append(f"preoptimize: skipped, ONNX Runtime's {level} rewrites wrote ops outside standard ONNX")
            return False
        result = graph_io.normalize(result)
        if _signature(result) == before:
            return False
        state.graph = gs.import_onnx(result)
        removed, added = _difference(model, result)
        state.notes.append(f"preoptimize: ONNX Runtime's {level} rewrites replaced {removed} with {added}")
        return True


def _signature(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in model.graph.node]


def _difference(before: onnx.ModelProto, after: onnx.ModelProto) -> tuple[str, str]:
    """The nodes that went and came, counted by op type, e.g. ("8 Slice, 1 Concat", "1 SpaceToDepth, 1 Gather")."""
    old, new = set(_signature(before)), set(_signature(after))

    def counted(nodes: set[tuple[str, str]]) -> str:
        return ", ".join(f"{n} {op}" for op, n in sorted(Counter(op for op, _ in nodes).items())) or "nothing"

    return counted(old - new), counted(new - old)
