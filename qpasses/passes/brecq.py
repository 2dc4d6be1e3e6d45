"""Block reconstruction: BRECQ (Li et al. 2021) with QDrop (Wei et al. 2022).

AdaRound (`adaround.py`) rounds one layer at a time to reconstruct that layer's output. Errors that
two layers of a block make together (a conv and the one after it, the projections around a softmax)
are invisible to it. Here a block of layers is reconstructed as one: its weights' floor/ceil choices
(AdaRound's soft rounding, h(V)) and the step sizes of the activation quantizers inside it (LSQ:
a straight-through rounding, so the loss reaches the scale) are learned together, against the float
block's outputs on calibration data:

    min  sum_outputs  E ||Q-block(x~) - block(x)||^2 / E ||block(x)||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

x is the block's input in the float model, x_q the same sample's input in the Q/DQ model with every
block before it already reconstructed (as AdaRound does per layer). QDrop: during the optimisation
each element of a quantized activation (the block's inputs included: there x_q against x) keeps its
quantization error with probability 1/2 and drops it otherwise, which flattens the loss surface the
rounding is learned on; the final block quantizes everything.

Blocks come from the graph itself: cut the node list (in graph order) wherever a single float
activation carries everything that later nodes read. Between two cuts lies a residual block, an
inverted-residual block, the attention or the MLP half of a transformer block, or a plain layer;
pieces without a quantized weighted layer join the next one, and a piece with more than
`max_layers` of them (a detector neck, where skip connections cross many layers) is split in graph
order, each part with the inputs and outputs it has. The block runs in torch (`torch_graph`); a block
with an op that has no torch rule is left to nearest rounding and reported.

Only quantizers wholly inside a block have their step learned (every member produced and read
there); zero points stay as calibrated, and power-of-two scales (`scale = "pow2"`) stay fixed.
Run after `calibrate`, before `insert-qdq`, instead of AdaRound. torch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qpasses import torch_graph
from qpasses.calibration.stats import Batches
from qpasses.calibration.qparams import QParams, dequantize
from qpasses.calibration.runner import StepRunner
from qpasses.errors import CalibrationError
from qpasses.pass_infra import Pass, PassContext, QuantState
from qpasses.torch_graph import require_torch

from .adaround import GAMMA, ZETA, AdaRoundConfig, SoftRounding
from .insert_qdq import realize

if TYPE_CHECKING:
    import torch

MAX_LAYERS = 6  # weighted layers per block: a ResNet or MobileNet block, an attention half
DROP = 0.5  # QDrop: the probability that an activation element drops its quantization error
SCALE_LR = 4e-5  # Adam on the activation steps (QDrop's setting); the rounding keeps AdaRound's


@dataclass
class Block:
    nodes: list[gs.Node]  # in graph order
    inputs: list[str]  # tensors read here and produced before (or graph inputs)
    outputs: list[str]  # tensors produced here and read after (or graph outputs)
    layers: list[str] = field(default_factory=list)  # quantized weighted nodes


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def find_blocks(graph: gs.Graph, layers: set[str], max_layers: int = MAX_LAYERS) -> list[Block]:
    """The blocks of `graph` (see the module docstring); `layers` are the weighted nodes to learn."""
    nodes = list(graph.nodes)
    readers_left: dict[str, int] = {}
    for node in nodes:
        for t in node.inputs:
            if isinstance(t, gs.Variable):
                readers_left[t.name] = readers_left.get(t.name, 0) + 1
    outputs = {t.name for t in graph.outputs}
    live = {t.name for t in graph.inputs if _is_float(t) and readers_left.get(t.name)}
    pieces, current = [], []
    for node in nodes:
        current.append(node)
        for t in node.inputs:
            if isinstance(t, gs.Variable):
                readers_left[t.name] -= 1
                if readers_left[t.name] == 0 and t.name not in outputs:
                    live.discard(t.name)
        live |= {t.name for t in node.outputs if _is_float(t) and (readers_left.get(t.name) or t.name in outputs)}
        if len(live) <= 1:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    merged, pending = [], []
    for piece in pieces:
        pending += piece
        if any(n.name in layers for n in pending):
            merged.append(pending)
            pending = []
    if pending and merged:
        merged[-1] += pending
    blocks = []
    for piece in merged:
        chunk, count = [], 0
        for node in piece:
            if node.name in layers and count == max_layers:
                blocks.append(chunk)
                chunk, count = [], 0
            chunk.append(node)
            count += node.name in layers
        blocks.append(chunk)
    return [_with_borders(graph, chunk, layers) for chunk in blocks]


def _with_borders(graph: gs.Graph, chunk: list[gs.Node], layers: set[str]) -> Block:
    """The block of `chunk`, with the shape computations it reads from earlier nodes (so that a
    Reshape's target follows the batch it runs on) and its inputs and outputs."""
    inside = {id(n) for n in chunk}
    pulled: list[gs.Node] = []
    pending = [t for n in chunk for t in n.inputs if isinstance(t, gs.Variable) and not _is_float(t)]
    while pending:
        tensor = pending.pop()
        for producer in tensor.inputs:
            if id(producer) not in inside:
                inside.add(id(producer))
                pulled.append(producer)
                pending += [t for t in producer.inputs if isinstance(t, gs.Variable) and not _is_float(t)]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    nodes = sorted([*pulled, *chunk], key=lambda n: order[id(n)])
    produced = {t.name for n in nodes for t in n.outputs}
    later = {t.name for n in graph.nodes if id(n) not in inside for t in n.inputs} | {t.name for t in graph.outputs}
    inputs = sorted({t.name for n in nodes for t in n.inputs if isinstance(t, gs.Variable) and t.name not in produced})
    outputs = sorted({t.name for n in chunk for t in n.outputs if t.name in later and _is_float(t)})
    return Block(nodes, inputs, outputs, [n.name for n in chunk if n.name in layers])


class _SoftWeight:
    """AdaRound's soft rounding of one weight (`SoftRounding`), with V learned in torch."""

    def __init__(self, w: np.ndarray, qp: QParams):
        torch = require_torch("--brecq")
        self.rounding = SoftRounding.of(w, qp)
        self.base, self.step, self.movable = (torch.as_tensor(a, dtype=torch.float32) for a in
                                              (self.rounding.base, self.rounding.step, self.rounding.movable))
        self.v = torch.nn.Parameter(torch.as_tensor(self.rounding.v, dtype=torch.float32))

    def h(self) -> "torch.Tensor":
        torch = require_torch("--brecq")
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def soft(self) -> "torch.Tensor":
        return self.base + self.step * self.h()

    def regulariser(self, beta: float) -> "torch.Tensor":
        return (self.movable * (1 - (2 * self.h() - 1).abs().pow(beta))).sum()

    def integers(self) -> np.ndarray:
        return self.rounding.integers(self.h().detach().numpy() >= 0.5)


class _Step:
    """One activation quantizer in torch: a fixed or a learned (LSQ) step, the zero point fixed."""

    def __init__(self, qp: QParams, learn: bool):
        torch = require_torch("--brecq")
        self.qp = qp
        self.scale = torch.tensor(float(qp.scale), dtype=torch.float32, requires_grad=learn)
        self.zp = float(qp.zero_point)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        r = x / self.scale
        r = r + (r.round() - r).detach()  # straight through: the gradient passes the rounding
        return ((r + self.zp).clamp(self.qp.qmin, self.qp.qmax) - self.zp) * self.scale


class _Masks:
    """QDrop's keep-the-error masks, cut from one random buffer at random offsets: drawing a fresh
    random tensor per quantized edge and iteration took a quarter of the pass's time."""

    def __init__(self, generator: Any, size: int = 1 << 22):
        torch = require_torch("--brecq")
        self.generator = generator
        self.buffer = torch.rand(size, generator=generator) < 1 - DROP

    def __call__(self, shape: tuple[int, ...]) -> "torch.Tensor":
        torch = require_torch("--brecq")
        n = int(np.prod(shape))
        if n * 2 > len(self.buffer):
            return torch.rand(shape, generator=self.generator) < 1 - DROP
        start = int(torch.randint(0, len(self.buffer) - n + 1, (1,), generator=self.generator))
        return self.buffer[start:start + n].view(shape)


class BlockReconstruct(Pass):
    name = "brecq"
    summary = "learn weight rounding and activation steps per block against the float block (--brecq)"
    requires = ("plan", "float_model")

    def __init__(self, iterations: int = AdaRoundConfig.iterations, samples: int = 128, batch_size: int = 16,
                 max_layers: int = MAX_LAYERS):
        self.config = AdaRoundConfig(iterations=iterations, batch_size=batch_size)
        self.samples = samples
        self.max_layers = max_layers

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        torch = require_torch("--brecq")
        if ctx.data is None:
            raise CalibrationError("--brecq needs calibration data (--data)")
        plan = state.plan
        weights = {w.node: w for w in plan.weights if w.input_index == 1}
        blocks = find_blocks(state.graph, set(weights), self.max_layers)
        limit = min(self.samples, ctx.max_samples or self.samples)
        exact = StepRunner(state.float_model, ctx.data, ctx.batch_size, limit, ctx.quiet, "brecq inputs")
        noisy: StepRunner | None = None
        fixed_batch = any(isinstance(t.shape[0], int) for t in state.graph.inputs if t.shape)
        done, skipped, changed = 0, [], False
        masks = _Masks(torch.Generator().manual_seed(ctx.seed))
        rng = np.random.default_rng(ctx.seed)
        with tqdm(total=len(blocks), desc="brecq", unit="block", disable=True if ctx.quiet else None, leave=False) as bar:
            for block in blocks:
                if ctx.out_of_time():
                    skipped.append(f"{block.layers[0]} and after: the time budget ran out")
                    break
                bar.update(1)
                why = torch_graph.unsupported(block.nodes) or (None if block.outputs else "the block has no output")
                if why is not None:
                    skipped.append(f"{block.layers[0]}: {why}")
                    continue
                simulated = realize(state.model(), state.target, plan)  # the blocks before, reconstructed
                noisy = noisy or StepRunner(simulated, ctx.data, ctx.batch_size, limit, ctx.quiet,
                                            "brecq inputs (quantized)", optimize=False)
                x_float = {name: Batches() for name in block.inputs}
                x_quant = {name: Batches() for name in block.inputs}
                exact.advance(state.float_model, x_float)
                noisy.advance(simulated, x_quant)
                x = {name: np.concatenate(v.parts) for name, v in x_float.items()}
                x_q = {name: np.concatenate(v.parts) for name, v in x_quant.items()}
                changed |= self._reconstruct(state, block, weights, x, x_q, fixed_batch, masks, rng)
                done += 1
        state.notes.append(f"brecq: {done} block(s) reconstructed ({sum(len(b.layers) for b in blocks)} layers in "
                           f"{len(blocks)} blocks), {len(skipped)} left to nearest rounding")
        state.notes.extend(f"brecq: block at {why} (not reconstructed)" for why in skipped)
        return changed

    def _reconstruct(self, state: QuantState, block: Block, weights: dict, x: dict[str, np.ndarray],
                     x_q: dict[str, np.ndarray], fixed_batch: bool, masks: _Masks, rng: np.random.Generator) -> bool:
        torch = require_torch("--brecq")
        plan, config = state.plan, self.config
        nodes = {n.name: n for n in block.nodes}
        soft = {weights[name].tensor: _SoftWeight(nodes[name].inputs[1].values, plan.qparams[weights[name].tensor])
                for name in block.layers}
        produced = {t.name for n in block.nodes for t in n.outputs}
        readers = {n.name for n in block.nodes}
        learn = state.target.activation.scale != "pow2"
        steps: dict[str, _Step] = {}
        edges: dict[tuple[str, int], _Step] = {}
        for act in plan.activations.values():
            anchor = plan.quantizer_of(act.tensor)
            inside = [c for c in act.consumers if c[0] in readers]
            if not inside:
                continue
            if anchor not in steps:
                members = plan.shares[anchor]
                internal = all(m in produced and all(c[0] in readers for c in plan.activations[m].consumers)
                               for m in members) and not set(members) & set(plan.model_outputs)
                steps[anchor] = _Step(plan.qparams[anchor], learn and internal)
            edges.update((c, steps[anchor]) for c in inside)
        constant_steps = {(c.node, c.input_index): _Step(plan.qparams[c.tensor], False) for c in plan.constants
                          if c.node in readers}
        learned = [s.scale for s in steps.values() if s.scale.requires_grad]
        params = [{"params": [w.v for w in soft.values()], "lr": config.lr}]
        if learned:
            params.append({"params": learned, "lr": SCALE_LR})
        optimizer = torch.optim.Adam(params)
        n = len(next(iter(x.values())))
        floats = {name: torch.as_tensor(v) for name, v in x.items()}
        quants = {name: torch.as_tensor(v) for name, v in x_q.items()}
        float_inputs = [name for name in block.inputs if floats[name].is_floating_point()]

        def forward(rows: np.ndarray, quantized: bool, drop: bool) -> list["torch.Tensor"]:
            feeds = {}
            for name in block.inputs:
                value = (quants if quantized else floats)[name][rows]
                if quantized and drop and name in float_inputs:
                    value = torch.where(masks(tuple(value.shape)), value, floats[name][rows])
                feeds[name] = value

            def hook(node: gs.Node, idx: int, value: "torch.Tensor") -> "torch.Tensor":
                step = edges.get((node.name, idx)) or constant_steps.get((node.name, idx))
                if not quantized or step is None or not value.is_floating_point():
                    return value
                fake = step(value)
                if drop and (node.name, idx) in edges:
                    return torch.where(masks(tuple(value.shape)), fake, value)
                return fake

            overrides = {tensor: w.soft() for tensor, w in soft.items()} if quantized else None
            if not fixed_batch:
                values = dict(feeds)
                torch_graph.run(block.nodes, values, hook, overrides=overrides)
                return [values[o] for o in block.outputs]
            parts = []  # a model exported with a fixed batch of 1: one sample at a time
            for i in range(len(rows)):
                values = {k: v[i:i + 1] if v.is_floating_point() and v.ndim else v for k, v in feeds.items()}
                torch_graph.run(block.nodes, values, hook, overrides=overrides)
                parts.append([values[o] for o in block.outputs])
            return [torch.cat(p) for p in zip(*parts)]

        batch = min(config.batch_size, n) if not fixed_batch else min(4, n)
        with torch.no_grad():  # the float block's outputs, once
            parts = [forward(np.arange(i, min(i + batch, n)), quantized=False, drop=False) for i in range(0, n, batch)]
        float_outputs = [torch.cat(p) for p in zip(*parts)]
        warm = int(config.warmup * config.iterations)
        start, end = config.beta
        for it in range(config.iterations):
            rows = rng.choice(n, size=batch, replace=False)
            targets = [t[rows] for t in float_outputs]
            got = forward(rows, quantized=True, drop=True)
            loss = sum(((g - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12) for g, t in zip(got, targets))
            if it >= warm:
                beta = end + (start - end) * (1 - (it - warm) / max(config.iterations - warm, 1))
                loss = loss + config.reg_weight * sum(w.regulariser(beta) for w in soft.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for s in learned:
                    s.clamp_(min=1e-8)
        changed = False
        for name in block.layers:  # the integers chosen, stored as grid points: insert-qdq reproduces them
            w = weights[name]
            constant = nodes[name].inputs[1]
            new = dequantize(soft[w.tensor].integers(), plan.qparams[w.tensor])
            changed |= not np.array_equal(new, constant.values)
            constant.values = new.astype(constant.values.dtype)
        for anchor, step in steps.items():
            if step.scale.requires_grad:
                qp = plan.qparams[anchor]
                scale = np.asarray(step.scale.detach().numpy(), np.float32).reshape(qp.scale.shape)
                plan.qparams[anchor] = QParams(scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis)
                z = float(qp.zero_point)
                plan.ranges[anchor] = ((qp.qmin - z) * float(scale), (qp.qmax - z) * float(scale))
                changed |= bool(scale != qp.scale)
        return changed
