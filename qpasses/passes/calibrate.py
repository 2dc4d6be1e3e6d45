"""Calibrate: set the range of every planned quantizer and turn it into qparams.

Activations: the float model (after folding) runs in ONNX Runtime on the calibration data and one
observer per quantized tensor streams its values; tensors that share a quantizer (concat inputs,
pooling in/out) merge their observers, so the shared range covers every member. Weights: an
observer of the `--weight-calib` method sees the whole constant, per channel on the planned axis.
With `--encodings`, the qparams come from an AIMET encodings file instead (qpasses/encodings.py).
Run after `annotate`.
"""

from __future__ import annotations

from qpasses.calibration.observers import make_observer
from qpasses.calibration.qparams import compute_qparams, constant_qparams
from qpasses.calibration.runner import observe
from qpasses.errors import CalibrationError
from qpasses.encodings import qparams_from
from qpasses.pass_infra import Pass, PassContext, QuantState


class Calibrate(Pass):
    name = "calibrate"
    summary = "run the float model in ONNX Runtime on calibration data; ranges and qparams per quantizer"
    requires = ("plan", "float_model")

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        if ctx.encodings is not None:  # ranges decided elsewhere (AIMET, an earlier qpass run)
            qparams_from(ctx.encodings, state.plan, state.target)
            calibrate_weights(state, ctx)  # the constant inputs, which need no encoding
            return False
        calibrate_activations(state, ctx)
        calibrate_weights(state, ctx)
        return False


def calibrate_activations(state: QuantState, ctx: PassContext) -> None:
    plan, target = state.plan, state.target
    if not plan.activations:
        return
    if ctx.data is None:
        raise CalibrationError("calibration data is required (--data: .npy/.npz, a directory, images or random)")
    observers = {name: make_observer(ctx.calib_method, **ctx.calib_options) for name in plan.activations}
    plan.calibration_samples = observe(state.float_model, observers, ctx.data, ctx.batch_size, ctx.max_samples, ctx.quiet)
    for anchor, members in plan.shares.items():
        merged = make_observer(ctx.calib_method, **ctx.calib_options)
        for name in members:
            merged.merge(observers[name])
        plan.ranges[anchor] = merged.compute_range(target.activation)
        plan.qparams[anchor] = compute_qparams(*plan.ranges[anchor], target.activation)


def calibrate_weights(state: QuantState, ctx: PassContext) -> None:
    """Qparams for every planned weight and constant input that has none yet (a weight read by two
    nodes is done once). A constant input takes the activation quantizer over its own values."""
    plan, target = state.plan, state.target
    tensors = {t.name: t for t in state.graph.tensors().values()}
    for c in plan.constants:
        if c.tensor not in plan.qparams:
            values = tensors[c.tensor].values
            plan.ranges[c.tensor] = (float(values.min()), float(values.max()))
            plan.qparams[c.tensor] = constant_qparams(values, target.activation)
    for w in plan.weights:
        if w.tensor in plan.qparams:
            continue
        quantizer = target.weight_quantizer(w.op_type)
        observer = make_observer(ctx.weight_calib, w.axis, **ctx.calib_options)
        observer.update(tensors[w.tensor].values)
        plan.ranges[w.tensor] = observer.compute_range(quantizer)
        plan.qparams[w.tensor] = compute_qparams(*plan.ranges[w.tensor], quantizer, w.axis)
