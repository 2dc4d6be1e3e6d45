"""AdaRound: learn whether each weight rounds up or down (Nagel et al. 2020; AIMET white paper sec. 4.4).

Rounding every weight to the nearest grid point minimises the error of each weight, not the error
of the layer's output. AdaRound chooses, per weight element, floor or ceil by reconstructing the
output of one layer at a time on calibration data. With the weight quantizer (s, z, [qmin, qmax])
broadcast on its per-channel axis:

    soft weight      W~ = s * clip(floor(W / s) + h(V), qmin - z, qmax - z)
    rectified sigm.  h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1
    objective        min_V  E || W x + b - (W~ x_q + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

where x is the layer's input in the float model and x_q the same sample's input in the Q/DQ model
as it stands when the layer is rounded: behind every quantized tensor and every layer rounded
before it ("asymmetric reconstruction", AdaRound paper sec. 4; AIMET does the same). So a layer
learns to compensate the error its inputs already carry, not only its own. The norm sums over
output channels and the mean runs over samples and spatial positions (the bias cancels; on a conv
output larger than 4x4 positions each sample of a minibatch contributes one random 4x4 window of
them: the same estimate at real-model sizes for a fraction of the cost). V starts where h(V) = frac(W / s);
lambda = 0.01; the regulariser is off for the first 20% of the iterations (warm-up), then beta
anneals linearly from 20 to 2, which drives every h(V) to 0 or 1. Adam (lr 1e-3) on V only,
minibatches of 32 samples (a window of each for a conv, as above). The final integer is

    q = clip(floor(W / s) + [h(V) >= 0.5] + z, qmin, qmax)

and the constant becomes s * (q - z), a point of the grid, so that `insert-qdq`'s round-to-nearest
reproduces q exactly. A weight already on the grid (frac = 0) keeps its value.

Layers are rounded level by level in graph order (a level: the layers with the same number of
layers above them, as `bn-recal` does). Per level, x comes from the float model and x_q from the
Q/DQ model realized with the weights rounded so far (run op by op in ONNX Runtime); each runs
only from the previous level's tensors to this level's inputs (`StepRunner`), so collecting the
inputs of every level costs about one model run, not one per level. Independent per-layer
rounding, with x_q just x fake-quantized, raised the output SQNR of a 4-bit ResNet but lost 19
points of top-1 (see the issue 5 note); the compounding error is what it missed. Run after `calibrate`, before
`insert-qdq`. torch is needed (imported here only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qpasses.calibration.qparams import QParams, dequantize, on_axis
from qpasses.calibration.runner import StepRunner
from qpasses.calibration.stats import Batches
from qpasses.errors import CalibrationError
from qpasses.graph import levels
from qpasses.pass_infra import Pass, PassContext, QuantState
from qpasses.torch_graph import require_torch

from .insert_qdq import realize

if TYPE_CHECKING:
    import torch

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    iterations: int = 1000
    batch_size: int = 32
    reg_weight: float = 0.01  # lambda
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from, to
    warmup: float = 0.2  # fraction of the iterations without the regulariser
    lr: float = 1e-3


@dataclass(frozen=True)
class LinearOp:
    """Gemm (transA = 0) or MatMul: y = alpha * x @ W, or x @ W^T when `transposed`; x is [rows, K]."""

    transposed: bool = False
    alpha: float = 1.0

    def __call__(self, x: "torch.Tensor", w: "torch.Tensor") -> "torch.Tensor":
        y = x @ (w.T if self.transposed else w)
        return y if self.alpha == 1.0 else self.alpha * y


@dataclass(frozen=True)
class ConvOp:
    """ONNX Conv without bias (auto_pad NOTSET); `pads` as in ONNX: all begins, then all ends."""

    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int = 1

    def __call__(self, x: "torch.Tensor", w: "torch.Tensor", padded: bool = False) -> "torch.Tensor":
        import torch.nn.functional as F

        nd = w.ndim - 2
        if any(self.pads) and not padded:
            # F.pad lists (begin, end) pairs from the last axis backwards
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (self.pads[i], self.pads[nd + i])])
        conv = F.conv1d if nd == 1 else F.conv2d
        return conv(x, w, stride=self.strides, dilation=self.dilations, groups=self.group)

    def windows(self, x: np.ndarray, rows: np.ndarray, starts: list[np.ndarray], size: tuple[int, ...],
                kernel: tuple[int, ...]) -> np.ndarray:
        """Per row, the part of input `x` [N, C, ...] that output positions start .. start + size - 1
        read, zero padding included: [rows, C, ...], in one gather (whole maps are never copied).
        The result is channels-last in memory, which torch's depthwise convolutions run 2x faster."""
        nd = len(size)
        index, inside = [rows.reshape(-1, *[1] * nd)], np.ones((1,) * (nd + 1), bool)
        for axis, (o, n, s, d, k) in enumerate(zip(starts, size, self.strides, self.dilations, kernel)):
            span = np.arange((n - 1) * s + d * (k - 1) + 1)
            shape = [-1] + [1] * axis + [len(span)] + [1] * (nd - 1 - axis)
            at = (o[:, None] * s + span[None, :] - self.pads[axis]).reshape(shape)
            inside = inside & (at >= 0) & (at < x.shape[2 + axis])
            index.append(np.clip(at, 0, x.shape[2 + axis] - 1))
        # the slice between the advanced indices puts the channels last: [rows, ..., C]
        return np.moveaxis(x[(index[0], slice(None), *index[1:])] * inside[..., None], -1, 1)


PATCH = 4  # output positions per spatial axis of the window each sample contributes on a large map


LayerOp = LinearOp | ConvOp


@dataclass
class SoftRounding:
    """The numbers soft rounding of one weight starts from (AdaRound here, BRECQ per block):
    W~ = base + step * h(V), V starting where h(V) = frac(W / s)."""

    floor: np.ndarray  # floor(W / s)
    zp: np.ndarray  # zero point on the weight's axis
    movable: np.ndarray  # floor and ceil differ and both lie in [qmin, qmax]
    base: np.ndarray  # s * clip(floor, qmin - z, qmax - z)
    step: np.ndarray  # s where movable, else 0
    v: np.ndarray  # the initial V
    qp: QParams

    @classmethod
    def of(cls, w: np.ndarray, qp: QParams) -> "SoftRounding":
        scale = on_axis(qp.scale.astype(np.float64), qp.axis, w.ndim)
        zp = on_axis(qp.zero_point.astype(np.float64), qp.axis, w.ndim)
        ratio = w.astype(np.float64) / scale
        floor = np.floor(ratio)
        frac = ratio - floor
        # a weight on the grid keeps its value (floor == ceil); one whose ceil would leave [qmin, qmax]
        # (or whose floor already has) has one choice too
        movable = (frac > 0) & (floor + zp >= qp.qmin) & (floor + 1 + zp <= qp.qmax)
        p = (frac - GAMMA) / (ZETA - GAMMA)  # h(V) = frac at the start
        return cls(floor, zp, movable, scale * np.clip(floor, qp.qmin - zp, qp.qmax - zp), scale * movable,
                   np.log(p / (1 - p)), qp)

    def integers(self, up: np.ndarray) -> np.ndarray:
        """q = clip(floor + up + z) for the movable weights rounded up (`up`: h(V) >= 0.5)."""
        q = self.floor + (up & self.movable) + self.zp
        return np.clip(q, self.qp.qmin, self.qp.qmax).astype(self.qp.zero_point.dtype)


def adaround_weight(w: np.ndarray, qp: QParams, op: LayerOp, x: np.ndarray, x_q: np.ndarray | None = None,
                    config: AdaRoundConfig = AdaRoundConfig(), seed: int = 0) -> np.ndarray:
    """The integers q (zero point included) AdaRound chooses for weight `w` of `op`.

    `x` holds the float layer's inputs, samples on axis 0 ([N, C, ...] for a conv, [rows, K] for a
    linear op); `x_q` what the rounded layer sees for the same samples (default: `x`).
    Deterministic for a given seed."""
    torch = require_torch("--adaround")
    rng = np.random.default_rng(seed)
    x_q = x if x_q is None else x_q

    def t(a: np.ndarray) -> "torch.Tensor":
        return torch.as_tensor(np.asarray(a, np.float32))

    rounding = SoftRounding.of(w, qp)
    # soft weight W~ = base + s * h(V) on the movable weights, the clipped floor elsewhere
    base, step_t, movable_t = t(rounding.base), t(rounding.step), t(rounding.movable)
    w_t = t(w)
    v = torch.nn.Parameter(t(rounding.v))
    optimizer = torch.optim.Adam([v], lr=config.lr, fused=True)

    def ramp(sig: "torch.Tensor") -> "torch.Tensor":  # h before its clamp to [0, 1]
        return torch.mul(sig, ZETA - GAMMA).add_(GAMMA)

    # A conv's objective is a mean over output positions: on a map larger than a window each
    # sample of a minibatch contributes one random PATCH x PATCH window of them (an unbiased
    # estimate; whole maps made a real model's convs take minutes each)
    out_size = _output_size(op, x.shape[2:], w.shape[2:]) if isinstance(op, ConvOp) else None
    patches = out_size is not None and int(np.prod(out_size)) > PATCH ** len(out_size)
    if patches:
        size = tuple(min(PATCH, n) for n in out_size)
        span = np.prod([(n - 1) * s + d * (k - 1) + 1 for n, s, d, k in zip(size, op.strides, op.dilations, w.shape[2:])])
        if x.shape[0] * np.prod(x.shape[2:]) < config.iterations * config.batch_size * span:
            # the windows read more pixels than the maps hold: a channels-last copy (seen through an
            # NCHW view) costs less than gathering every pixel's channels from C separate planes
            x, x_q = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, x_q))
    warm = int(config.warmup * config.iterations)
    start, end = config.beta
    for it in range(config.iterations):
        rows = rng.choice(len(x), size=min(config.batch_size, len(x)), replace=False)
        if patches:
            starts = [rng.integers(0, n - m + 1, size=len(rows)) for n, m in zip(out_size, size)]
            x_in, xq_in = (op.windows(a, rows, starts, size, w.shape[2:]) for a in (x, x_q))
            run = lambda a, b: op(a, b, padded=True)  # noqa: E731
        else:
            x_in, xq_in, run = x[rows], x_q[rows], op
        # autograd only through the layer; the chain rule down to V is written out below, in place:
        # on a large weight (an 8M-weight classifier) the elementwise part dominates each step
        with torch.no_grad():
            target = run(t(x_in), w_t)
            sig = torch.sigmoid(v)
            unclamped = ramp(sig)
            up = unclamped.clamp(0, 1)
            inside = up == unclamped
            soft = torch.addcmul(base, step_t, up).requires_grad_()
        loss = (run(t(xq_in), soft) - target).pow(2).sum(1).mean()
        (grad,) = torch.autograd.grad(loss, soft)
        with torch.no_grad():
            grad.mul_(step_t)  # d loss / d h
            if it >= warm:  # d/dh of lambda * (1 - |a|^beta), a = 2h - 1: -2 beta lambda a |a|^(beta - 2)
                beta = end + (start - end) * (1 - (it - warm) / max(config.iterations - warm, 1))
                a = up.mul_(2).sub_(1)
                grad.sub_(a.abs().pow_(beta - 2).mul_(a).mul_(movable_t), alpha=2 * beta * config.reg_weight)
            grad.mul_(inside).mul_(sig.mul_(torch.sub(1.0, sig)).mul_(ZETA - GAMMA))  # d h / d V
        v.grad = grad.contiguous()  # fused Adam walks the memory of V and of its gradient alike
        optimizer.step()
    with torch.no_grad():
        up = ramp(torch.sigmoid(v)).clamp(0, 1).numpy() >= 0.5
    return rounding.integers(up)


def _output_size(op: ConvOp, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...] | None:
    nd = len(spatial)
    sizes = []
    for i, (n, k) in enumerate(zip(spatial, kernel)):
        total = n + op.pads[i] + op.pads[nd + i]
        sizes.append((total - op.dilations[i] * (k - 1) - 1) // op.strides[i] + 1)
    return tuple(sizes) if all(v > 0 for v in sizes) else None


@dataclass
class _Layer:
    node: gs.Node
    weight: gs.Constant
    op: LayerOp
    input: str  # the tensor feeding input 0
    qp: QParams


def _samples(inputs: Batches, op: LayerOp) -> np.ndarray:
    x = np.concatenate(inputs.parts)
    return x.reshape(-1, x.shape[-1]) if isinstance(op, LinearOp) else x  # MatMul over [..., K]: rows are samples


def _layer_op(node: gs.Node) -> LayerOp | str:
    """How to run `node` in torch, or why AdaRound does not handle it."""
    weight = node.inputs[1]
    if node.op == "Conv":
        if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            return "auto_pad is not NOTSET"
        nd = weight.values.ndim - 2
        if nd not in (1, 2):
            return f"only 1-D and 2-D convolutions are handled, this one is {nd}-D"
        return ConvOp(tuple(node.attrs.get("strides", [1] * nd)), tuple(node.attrs.get("pads", [0] * 2 * nd)),
                      tuple(node.attrs.get("dilations", [1] * nd)), int(node.attrs.get("group", 1)))
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA = 1"
        return LinearOp(bool(node.attrs.get("transB", 0)), float(node.attrs.get("alpha", 1.0)))
    if node.op == "MatMul":
        if weight.values.ndim != 2:
            return f"MatMul weight is {weight.values.ndim}-D, not 2-D"
        return LinearOp()
    return f"AdaRound does not handle {node.op}"


class AdaRound(Pass):
    name = "adaround"
    summary = "choose floor or ceil per weight by layer-wise output reconstruction (--adaround)"
    requires = ("plan", "float_model")

    def __init__(self, iterations: int = AdaRoundConfig.iterations, samples: int = 256,
                 batch_size: int = AdaRoundConfig.batch_size):
        self.config = AdaRoundConfig(iterations=iterations, batch_size=batch_size)
        self.samples = samples

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        require_torch("--adaround")
        if ctx.data is None:
            raise CalibrationError("--adaround needs calibration data (--data)")
        layers, skipped = self._layers(state)
        state.notes.extend(f"adaround: {node} skipped: {why}" for node, why in skipped)
        limit = min(self.samples, ctx.max_samples or self.samples)
        level = levels(state.graph, {layer.node.name for layer in layers})
        exact = StepRunner(state.float_model, ctx.data, ctx.batch_size, limit, ctx.quiet, "adaround inputs")
        noisy: StepRunner | None = None
        changed = False
        with tqdm(total=len(layers), desc="adaround", unit="layer", disable=True if ctx.quiet else None, leave=False) as bar:
            for depth in sorted({level[layer.node.name] for layer in layers}):
                if ctx.out_of_time():
                    state.notes.append(f"adaround: stopped at the time budget: {len(layers) - bar.n} layer(s) "
                                       "left to nearest rounding")
                    break
                simulated = realize(state.model(), state.target, state.plan)  # with the weights rounded so far
                noisy = noisy or StepRunner(simulated, ctx.data, ctx.batch_size, limit, ctx.quiet,
                                            "adaround inputs (quantized)", optimize=False)
                seen_by = {node.name: node.input[0] for node in simulated.graph.node}
                now = [layer for layer in layers if level[layer.node.name] == depth]
                x_float = {layer.input: Batches() for layer in now}
                x_quantized = {seen_by[layer.node.name]: Batches() for layer in now}
                exact.advance(state.float_model, x_float)
                noisy.advance(simulated, x_quantized)
                for layer in now:
                    x, x_q = (_samples(inputs, layer.op) for inputs in
                              (x_float[layer.input], x_quantized[seen_by[layer.node.name]]))
                    w = layer.weight.values
                    q = adaround_weight(w, layer.qp, layer.op, x, x_q, self.config, ctx.seed + bar.n)
                    layer.weight.values = dequantize(q, layer.qp)
                    changed |= not np.array_equal(layer.weight.values, w)
                    bar.update(1)
        state.notes.append(f"adaround: {len(layers)} layer(s) optimised, {len(skipped)} skipped")
        return changed

    def _layers(self, state: QuantState) -> tuple[list[_Layer], list[tuple[str, str]]]:
        plan = state.plan
        nodes = {n.name: n for n in state.graph.nodes}
        layers: list[_Layer] = []
        skipped: list[tuple[str, str]] = []
        first_user: dict[str, str] = {}
        for wq in plan.weights:
            node = nodes[wq.node]
            weight, x = node.inputs[wq.input_index], node.inputs[0]
            op = "the weight is not a float32 constant at input 1"
            if wq.input_index == 1 and isinstance(weight, gs.Constant) and weight.values.dtype == np.float32:
                op = _layer_op(node)
            if isinstance(op, str):
                why = op
            elif not isinstance(x, gs.Variable) or x.dtype is None or np.dtype(x.dtype) != np.float32:
                why = "input 0 is not a float32 activation"
            elif wq.tensor in first_user:
                why = f"the weight is shared with {first_user[wq.tensor]}, optimised for that node"
            else:
                layers.append(_Layer(node, weight, op, x.name, plan.qparams[wq.tensor]))
                first_user[wq.tensor] = node.name
                continue
            skipped.append((node.name, why))
        return layers, skipped
