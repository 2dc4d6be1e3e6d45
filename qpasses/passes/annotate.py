"""Annotate: apply the target's graph rules and write the quantization plan. No graph edits.

Rules, all read from the target file:
- an op type listed under `ops` has its activation inputs quantized (`inputs = "all"` or indices);
  Conv/ConvTranspose/Gemm/MatMul also get their constant weight quantized, per channel on the
  output-channel axis (`qpasses.ops`);
- a supergroup (e.g. Conv -> Add -> Relu) is one quantization unit: an edge inside a matched
  instance gets no Q/DQ. A TensorRT-style residual Add is such a group: the input the conv
  produces stays float and only the skip input is quantized (MQBench graph 2);
- `share = true` makes an op's quantized inputs and its output use one quantizer: concat inputs
  share a scale (MQBench app. G), MaxPool needs no requantization (AIMET 7.3.1);
- the model's outputs stay float unless `quantize_model_output`; its inputs are quantized only
  where a consumer's rule says so, or everywhere with `quantize_model_input`;
- `float_tail` (the default) keeps float every op that no conv/matmul comes after: a
  detector's decode, sigmoids and the concat of boxes and scores are cheap, and one int8 grid over
  pixel offsets and probabilities 300x apart rounds every score away;
- with `[fusion]` (ONNX Runtime), only whole DequantizeLinear -> op -> QuantizeLinear groups the
  engine can fuse are planned (`_fit_fusion`), and their float constant inputs are stored as
  integers (`ConstantQuant`) where 8 bits hold them (`_constant_problem`).
Run after BatchNorm folding (a folded BN must not separate a conv from its Add).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.calibration.qparams import constant_qparams, fake_quantize
from qpasses.errors import InputError
from qpasses.graph import node_reads
from qpasses.pass_infra import Pass, PassContext, QuantState
from qpasses.plan import ActivationQuant, BiasQuant, ConstantQuant, Edge, QuantPlan, WeightQuant
from qpasses.ops import WEIGHTED_OPS, weight_axis
from qpasses.targets.schema import Target

FLOAT_DTYPES = (np.float32, np.float16)


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) in [np.dtype(d) for d in FLOAT_DTYPES]


def _depths(graph: gs.Graph) -> dict[str, int]:
    """Longest path (in nodes) from the graph inputs: prefers the main branch of a residual block."""
    depth: dict[str, int] = {}
    for node in graph.nodes:
        depth[node.name] = 1 + max((depth[i.inputs[0].name] for i in node.inputs
                                    if isinstance(i, gs.Variable) and i.inputs), default=0)
    return depth


def match_supergroups(graph: gs.Graph, target: Target) -> tuple[list[list[gs.Node]], set[Edge]]:
    """Match the target's supergroups on single-consumer chains; return instances and inner edges."""
    depth = _depths(graph)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    candidates = []
    for pattern in target.supergroups:
        for head in graph.nodes:
            if head.op != pattern[0]:
                continue
            chain = [head]
            for op in pattern[1:]:
                out = chain[-1].outputs[0]
                if len(out.outputs) != 1 or out.name in outputs or out.outputs[0].op != op:
                    break
                chain.append(out.outputs[0])
            if len(chain) == len(pattern):
                candidates.append(chain)
    candidates.sort(key=lambda c: (-len(c), -depth[c[0].name], order[c[0].name]))
    used: set[str] = set()
    groups, inner = [], set()
    for chain in candidates:
        if any(n.name in used for n in chain):
            continue
        used.update(n.name for n in chain)
        groups.append(chain)
        for prev, node in zip(chain, chain[1:]):
            for idx, tensor in enumerate(node.inputs):
                if tensor is prev.outputs[0]:
                    inner.add((node.name, idx))
    groups.sort(key=lambda c: order[c[0].name])
    return groups, inner


class _Shares:
    """Union-find over tensor names: tensors in one set use one quantizer."""

    def __init__(self, order: dict[str, int]):
        self.parent: dict[str, str] = {}
        self.order = order

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the tensor produced first anchors the set, so names are stable
            first, second = sorted((ra, rb), key=lambda n: (self.order.get(n, -1), n))
            self.parent[second] = first


class Annotate(Pass):
    name = "annotate"
    summary = "apply the target's graph rules: choose Q/DQ edges, weights, shared quantizers"

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        state.plan = build_plan(state.graph, state.target)
        if ctx.float_layers:
            state.plan = _keep_float(state.plan, ctx.float_layers)
        state.float_model = state.model()
        return False


def _keep_float(plan: QuantPlan, names: tuple[str, ...]) -> QuantPlan:
    layer_of, layers = plan.layer_of(), set(plan.layers())
    unknown = [n for n in names if layer_of.get(n) not in layers]
    if unknown:
        raise InputError(f"--float-layer {unknown[0]}: no quantized layer of that name (`qpass analyze` lists them)")
    return plan.keep_float({layer_of[n] for n in names}, "kept in float on request (--float-layer)")


def float_tail(graph: gs.Graph) -> set[str]:
    """The nodes no conv/matmul comes after, on any path: what runs between the last heavy layer and
    the outputs. A node with a subgraph (If, Loop) may hold heavy layers and is never part of it."""
    readers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node_reads(node):
            readers.setdefault(tensor.name, []).append(node)
    heavy_after: dict[str, bool] = {}
    for node in reversed(graph.nodes):  # toposorted: every reader is decided before its producer
        after = [r for out in node.outputs for r in readers.get(out.name, [])]
        heavy_after[node.name] = any(r.op in WEIGHTED_OPS or heavy_after[r.name] or _has_subgraph(r) for r in after)
    return {n.name for n in graph.nodes if not (heavy_after[n.name] or n.op in WEIGHTED_OPS or _has_subgraph(n))}


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(g, gs.Graph) for g in v))
               for v in node.attrs.values())


def build_plan(graph: gs.Graph, target: Target, float_nodes: frozenset[str] = frozenset()) -> QuantPlan:
    """The target's plan for `graph`; `float_nodes` run float whatever the rules say (what `qpass
    check` found a model keeps float, so that they tie no quantizers)."""
    plan = QuantPlan()
    groups, inner = match_supergroups(graph, target)
    tail = float_tail(graph) if target.float_tail else set()
    if tail:  # a supergroup whose head is in the tail runs float; one that ends in it keeps its members
        groups = [g for g in groups if g[0].name not in tail]
        grouped = {n.name for g in groups for n in g}
        inner = {e for e in inner if e[0] in grouped}
        tail -= grouped
    plan.groups = [[n.name for n in g] for g in groups]
    plan.node_outputs = {n.name: n.outputs[0].name for n in graph.nodes if n.outputs}
    in_group = {n.name: g[0].name for g in groups for n in g[1:]}
    edges: dict[str, list[Edge]] = {}

    def add_edge(tensor: gs.Tensor, node: gs.Node, idx: int) -> bool:
        if not (isinstance(tensor, gs.Variable) and _is_float(tensor)) or (node.name, idx) in inner:
            return False
        consumers = edges.setdefault(tensor.name, [])
        if (node.name, idx) not in consumers:
            consumers.append((node.name, idx))
        return True

    share_nodes = []
    wanted: dict[str, list[str]] = {}  # quantized node -> the activation tensors its rule quantizes
    constants: dict[str, list[tuple[int, gs.Constant]]] = {}  # quantized node -> float constants among its rule's inputs
    for node in graph.nodes:
        rule = target.ops.get(node.op)
        if node.op in target.float_ops:
            plan.float_nodes[node.name] = "listed in the target's float_ops"
            continue
        if node.name in float_nodes:
            plan.float_nodes[node.name] = "float in this model"
            continue
        if rule is None:
            if node.name in in_group:
                plan.fused_nodes[node.name] = in_group[node.name]
            else:
                plan.float_nodes[node.name] = f"the target has no int8 rule for {node.op}"
            continue
        if node.name in tail:
            plan.float_nodes[node.name] = "no conv/matmul comes after it: the float tail (target rule float_tail)"
            continue
        skip = set()
        if node.op in WEIGHTED_OPS and len(node.inputs) > 1:
            weight = node.inputs[1]
            if isinstance(weight, gs.Constant):
                if not np.issubdtype(weight.values.dtype, np.floating):
                    plan.float_nodes[node.name] = "its weight is not floating point"
                    continue
                quantizer = target.weight_quantizer(node.op)
                axis = weight_axis(node) if quantizer.granularity == "per_channel" else None
                plan.weights.append(WeightQuant(node.name, node.op, 1, weight.name, axis))
                skip.add(1)
            elif node.op != "MatMul":
                plan.float_nodes[node.name] = "its weight is computed at run time, not a constant"
                continue
            bias_idx = WEIGHTED_OPS[node.op].bias_input
            if bias_idx is not None and len(node.inputs) > bias_idx:
                skip.add(bias_idx)
                bias = node.inputs[bias_idx]
                if (target.bias == "int32" and isinstance(bias, gs.Constant) and 1 in skip
                        and bias.values.ndim <= 1 and isinstance(node.inputs[0], gs.Variable)):
                    plan.biases.append(BiasQuant(node.name, bias.name, node.inputs[0].name, weight.name))
        indices = range(len(node.inputs)) if rule.inputs == "all" else [i for i in rule.inputs if i < len(node.inputs)]
        added = [add_edge(node.inputs[idx], node, idx) for idx in indices if idx not in skip]
        if 1 in skip or any(added):
            plan.quantized_nodes.append(node.name)
            wanted[node.name] = [node.inputs[idx].name for idx in indices if idx not in skip
                                 and (node.name, idx) in edges.get(node.inputs[idx].name, [])]
            constants[node.name] = [(idx, node.inputs[idx]) for idx in indices if idx not in skip
                                    and isinstance(node.inputs[idx], gs.Constant) and _is_float(node.inputs[idx])]
        else:
            plan.float_nodes[node.name] = "no float activation input to quantize (all inside a supergroup or constant)"
        if rule.share:
            share_nodes.append(node)

    if target.quantize_model_input:
        for tensor in graph.inputs:
            for consumer in tensor.outputs:
                for idx, t in enumerate(consumer.inputs):
                    if t is tensor:
                        add_edge(tensor, consumer, idx)

    if target.quantize_model_output:
        for tensor in graph.outputs:
            if _is_float(tensor) and tensor.inputs:
                edges.setdefault(tensor.name, [])
                plan.model_outputs.append(tensor.name)

    written = set()
    if target.fusion:
        written = _fit_fusion(graph, target, plan, edges, wanted, constants, groups, inner)
        plan.constants = [ConstantQuant(n, idx, c.name) for n in plan.quantized_nodes for idx, c in constants[n]]

    producer_order = {t.name: i for i, t in enumerate(graph.inputs)}
    for i, node in enumerate(graph.nodes):
        for out in node.outputs:
            producer_order[out.name] = len(graph.inputs) + i
    shares = _Shares(producer_order)
    for node in [n for n in share_nodes if n.name in plan.quantized_nodes]:
        members = [t.name for t in node.inputs if t.name in edges] + [node.outputs[0].name]
        for name in members[1:]:
            shares.union(members[0], name)

    for name in sorted(edges, key=lambda n: (producer_order.get(n, -1), n)):
        plan.activations[name] = ActivationQuant(name, edges[name], shares.find(name), name in written)
    for act in plan.activations.values():
        plan.shares.setdefault(act.share, []).append(act.tensor)
    # a bias can be integer only if its input really is quantized per tensor
    plan.weights = [w for w in plan.weights if w.node in plan.quantized_nodes]
    plan.biases = [b for b in plan.biases if b.node in plan.quantized_nodes and b.input_tensor in plan.activations
                   and any(e[0] == b.node for e in plan.activations[b.input_tensor].consumers)]
    return plan


def _fit_fusion(graph: gs.Graph, target: Target, plan: QuantPlan, edges: dict[str, list[Edge]],
                wanted: dict[str, list[str]], constants: dict[str, list[tuple[int, gs.Constant]]],
                groups: list[list[gs.Node]], inner: set[Edge]) -> set[str]:
    """For an engine that fuses DequantizeLinear -> op -> QuantizeLinear groups (`[fusion]`): keep
    exactly the Q/DQ that an integer kernel reads or writes, quantize each weighted layer's output
    so that the layer can fuse, and let every reader of a quantized tensor read the dequantized
    value (a reader that bypasses the QuantizeLinear stops the producer's fusion). Returns the
    tensors quantized for their producer's sake (an integer kernel writes them)."""
    nodes = {n.name: n for n in graph.nodes}
    tail = {g[0].name: g[-1] for g in groups}  # a supergroup writes its last node's output
    out_of = {n: (tail.get(n) or nodes[n]).outputs[0].name for n in plan.quantized_nodes}
    writer = {t: n for n, t in out_of.items()}
    model_outputs = {t.name for t in graph.outputs} - set(plan.model_outputs)
    # read inside an If/Loop body from the enclosing scope: that reader bypasses any QuantizeLinear
    model_outputs |= {t.name for n in graph.nodes for t in node_reads(n) if all(t is not i for i in n.inputs)}
    needs_out = {n for n in plan.quantized_nodes if nodes[n].op not in target.fusion.float_output}
    for name in needs_out:
        if nodes[name].op in WEIGHTED_OPS and out_of[name] not in model_outputs:
            edges.setdefault(out_of[name], [])
    quantized = set(edges)

    constant_problem = {name: _constant_problem(nodes[name], constants[name], target) for name in plan.quantized_nodes}

    def fuses(name: str) -> bool:
        if constant_problem[name] or not all(t in quantized for t in wanted[name]):
            return False
        return name not in needs_out or (out_of[name] in quantized and out_of[name] not in model_outputs)

    changed = True
    while changed:  # drop Q/DQ that no fused kernel reads or writes, until nothing changes
        changed = False
        for tensor in sorted(quantized - set(plan.model_outputs)):
            read = any(fuses(c) for c, _ in edges[tensor] if tensor in wanted.get(c, []))
            if not read and not (tensor in writer and fuses(writer[tensor])):
                quantized.discard(tensor)
                changed = True
    for name in [n for n in plan.quantized_nodes if not fuses(n)]:
        plan.quantized_nodes.remove(name)
        if constant_problem[name]:
            why = constant_problem[name]
        elif name in needs_out and out_of[name] in model_outputs:
            why = "its output quantized, and that is a model output or read inside a subgraph"
        elif any(t not in quantized for t in wanted[name]):
            why = "every input dequantized, and one has no integer kernel writing or reading it"
        else:
            why = "its output quantized, and that is read by float ops only"
        plan.float_nodes[name] = f"the engine fuses {nodes[name].op} only with {why}"
    tensors = graph.tensors()
    for tensor in list(edges):
        if tensor not in quantized:
            del edges[tensor]
            continue
        edges[tensor] = [(reader.name, idx) for reader in tensors[tensor].outputs if nodes.get(reader.name) is reader
                         for idx, t in enumerate(reader.inputs) if t.name == tensor and (reader.name, idx) not in inner]
    return {t for t in quantized if t in writer and fuses(writer[t])}


def _constant_problem(node: gs.Node, constants: list[tuple[int, gs.Constant]], target: Target) -> str | None:
    """Why a constant input keeps `node` from fusing, or None: it is stored as integers with the
    activation quantizer, which must hold an addend within `constant_error` of its largest value
    and a factor within `constant_error` of every element (a per-channel scale with a tiny entry
    would zero that channel)."""
    for _, constant in constants:
        if target.ops[node.op].share:
            return f"every input dequantized, and {constant.name} is a constant that cannot share the other inputs' scale"
        values = constant.values.astype(np.float64)
        if values.size == 0:
            continue
        error = np.abs(fake_quantize(values, constant_qparams(values, target.activation)) - values)
        relative = error.max() / max(np.abs(values).max(), 1e-30) if node.op in ("Add", "Sub") else \
            np.max(error / np.maximum(np.abs(values), 1e-30))
        if relative > target.fusion.constant_error:
            return (f"every input dequantized, and its constant {constant.name} would be off by "
                    f"{100 * relative:.1f}% in {target.activation.bits} bits")
    return None
