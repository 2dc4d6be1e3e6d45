"""BatchNorm re-calibration in folded space (MQBench app. C.3).

MQBench re-estimates each BN's running statistics with the quantized network and keeps its
affine parameters. After folding, the BN is gone, but its output is the folded layer's output y,
which the BN made have per-channel mean beta and standard deviation |gamma| (the recorded targets
in `state.bn_records`). So with the quantization simulated, we measure y's mean m and standard
deviation sigma per channel on the calibration data and correct the folded layer to

    y' = (y - m) * |gamma| / sigma + beta:   W' = a W,  b' = a b + beta - a m,  a = |gamma| / sigma

(a per output channel). Layers are corrected level by level in graph order (a level: the layers
with the same number of recorded layers above them), so each is measured behind already corrected
inputs; each level's run starts from the tensors the previous level left (`StepRunner`), so the
whole measurement costs about one model run; a corrected weight gets new qparams at once, and at
the end the activation ranges are re-derived by calibrating again. Conv and Gemm only (where
folding put the BN); a channel constant under quantization (sigma ~ 0) is left alone.
Run after `calibrate`, before `insert-qdq`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.calibration.runner import Ignore, StepRunner
from qpasses.graph import levels
from qpasses.calibration.stats import ChannelMoments
from qpasses.pass_infra import Pass, PassContext, QuantState

from .calibrate import Calibrate, calibrate_weights
from .bias_correct import MAX_SAMPLES
from .insert_qdq import realize

def _output_axis_scale(node: gs.Node, a: np.ndarray) -> None:
    """W' = a W along the output-channel axis, b' = a b (the bias always exists after folding)."""
    w, b = node.inputs[1], node.inputs[2]
    if node.op == "Conv":
        shape = (-1,) + (1,) * (w.values.ndim - 1)
    else:  # Gemm: B is [N, K] with transB, else [K, N]
        shape = (-1, 1) if node.attrs.get("transB", 0) else (1, -1)
    w.values = (w.values * a.reshape(shape)).astype(w.values.dtype)
    b.values = (b.values * a).astype(b.values.dtype)


class BNRecalibrate(Pass):
    name = "bn-recal"
    summary = "re-estimate folded BatchNorm statistics with quantization simulated (--bn-recal)"
    requires = ("plan", "float_model")

    def __init__(self, min_std: float = 1e-6):
        self.min_std = min_std

    def layers(self, state: QuantState) -> dict[str, gs.Node]:
        """Folded-BN output tensor -> its Conv/Gemm, for the layers whose statistics are on record."""
        producers = {n.outputs[0].name: n for n in state.graph.nodes if n.outputs}
        planned = {w.node for w in state.plan.weights}
        found = {}
        for tensor, record in state.bn_records.items():
            node = producers.get(tensor)
            if (node is not None and node.name == record["producer"] and node.op in ("Conv", "Gemm")
                    and node.name in planned and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant)):
                found[tensor] = node
        return found

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        layers = self.layers(state)
        if not layers:
            why = "no BatchNorm statistics on record" if not state.bn_records else "no folded Conv/Gemm layer is quantized"
            state.notes.append(f"bn re-calibration: nothing to do ({why})")
            return False
        level = levels(state.graph, {n.name for n in layers.values()})
        steps: StepRunner | None = None
        for depth in sorted({level[n.name] for n in layers.values()}):
            tensors = sorted(t for t, n in layers.items() if level[n.name] == depth)
            simulated = realize(state.model(), state.target, state.plan)
            steps = steps or StepRunner(simulated, ctx.data, ctx.batch_size, min(ctx.max_samples or MAX_SAMPLES, MAX_SAMPLES),
                                        ctx.quiet, "BN statistics", optimize=False)
            # up to the level's inputs, behind the layers corrected so far; the layers' outputs are
            # only peeked at: the layers change below, and the next step runs them again
            names = {layers[t].name for t in tensors}
            inputs = {node.input[0] for node in simulated.graph.node if node.name in names}
            steps.advance(simulated, {name: Ignore() for name in inputs})
            moments = {tensor: ChannelMoments() for tensor in tensors}
            steps.peek(simulated, moments)
            for tensor in tensors:
                self.correct(layers[tensor], state.bn_records[tensor], moments[tensor])
                for w in state.plan.weights:
                    if w.node == layers[tensor].name:
                        del state.plan.qparams[w.tensor]
            calibrate_weights(state, ctx)
        state.float_model = state.model()
        state.plan.ranges.clear()
        state.plan.qparams.clear()
        Calibrate().run(state, ctx)
        skipped = len(state.bn_records) - len(layers)
        state.notes.append(f"bn re-calibration: {len(layers)} layer(s) re-estimated"
                           + (f", {skipped} recorded BN(s) not on a quantized Conv/Gemm" if skipped else ""))
        return True

    def correct(self, node: gs.Node, record: dict, moments: ChannelMoments) -> None:
        std = np.sqrt(moments.var())
        ok = std > self.min_std
        a = np.where(ok, np.abs(record["gamma"]) / np.where(ok, std, 1.0), 1.0)
        _output_axis_scale(node, a)
        bias = node.inputs[2]
        bias.values = (bias.values + np.where(ok, record["beta"] - a * moments.mean(), 0.0)).astype(bias.values.dtype)
