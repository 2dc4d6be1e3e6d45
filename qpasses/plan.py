"""The quantization plan: which tensors get Q/DQ, for which consumers, sharing which quantizer.

`annotate` writes it from the target's rules, `calibrate` adds ranges and qparams, `insert_qdq`
realises it in the graph, and the report reads it. Nothing in it depends on the ONNX protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from qpasses.calibration.qparams import QParams

Edge = tuple[str, int]  # (consumer node name, input index)


@dataclass
class ActivationQuant:
    """One activation tensor read through a Q/DQ pair by the listed consumers."""

    tensor: str
    consumers: list[Edge]
    share: str = ""  # anchor tensor of the quantizer this tensor shares (itself when alone)
    written: bool = False  # quantized for its producer's integer kernel to write (fusing engines)


@dataclass
class WeightQuant:
    node: str
    op_type: str
    input_index: int
    tensor: str
    axis: int | None  # the per-channel axis, None for per-tensor


@dataclass
class ConstantQuant:
    """A float constant input of an integer kernel (the 3 of x + 3), stored as integers with the
    activation quantizer over its own values: fusing engines read every input of a kernel as integers."""

    node: str
    input_index: int
    tensor: str


@dataclass
class BiasQuant:
    """An int32 bias with scale s_input * s_weight, so integer kernels add it to the accumulator."""

    node: str
    tensor: str
    input_tensor: str
    weight_tensor: str


@dataclass
class QuantPlan:
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    weights: list[WeightQuant] = field(default_factory=list)
    biases: list[BiasQuant] = field(default_factory=list)
    constants: list[ConstantQuant] = field(default_factory=list)
    shares: dict[str, list[str]] = field(default_factory=dict)  # anchor -> member tensors
    groups: list[list[str]] = field(default_factory=list)  # supergroup instances (node names)
    model_outputs: list[str] = field(default_factory=list)  # graph outputs given a Q/DQ of their own
    fused_nodes: dict[str, str] = field(default_factory=dict)  # node -> head of its supergroup, or the node
    # whose QuantizeLinear took its scalar factor (fusing engines)
    float_nodes: dict[str, str] = field(default_factory=dict)  # node -> why it stays float
    quantized_nodes: list[str] = field(default_factory=list)
    calibration_samples: int = 0  # samples the activation observers saw
    methods: dict[str, str] = field(default_factory=dict)  # share anchor -> the method `--calib best` chose
    ranges: dict[str, tuple] = field(default_factory=dict)  # share anchor -> (lo, hi)
    qparams: dict[str, QParams] = field(default_factory=dict)  # share anchor or weight tensor key
    node_outputs: dict[str, str] = field(default_factory=dict)  # node -> its first output, for reports

    def quantizer_of(self, tensor: str) -> str:
        """The share anchor whose qparams `tensor` uses."""
        return self.activations[tensor].share or tensor

    def layer_of(self) -> dict[str, str]:
        """node -> the layer it belongs to: the head of its supergroup instance, or itself."""
        heads = {n: g[0] for g in self.groups for n in g}
        return {n: heads.get(n, n) for n in self.node_outputs}

    def layers(self) -> list[str]:
        """The quantized layers in graph order: a supergroup instance is one layer."""
        layer_of = self.layer_of()
        return list(dict.fromkeys(layer_of[n] for n in self.quantized_nodes))

    def members(self, layer: str) -> list[str]:
        """A layer's nodes: its supergroup instance, or itself."""
        return next((g for g in self.groups if g[0] == layer), [layer])

    def layer_output(self, layer: str) -> str:
        """The tensor a layer's last node produces."""
        return self.node_outputs[self.members(layer)[-1]]

    def keep_float(self, layers: Iterable[str], why: str) -> "QuantPlan":
        """A copy in which the named layers (whole supergroup instances) run in float.

        Their weights, biases, constants and input Q/DQ go; a tensor they produce is still quantized where a
        quantized consumer reads it. Calibrated qparams are kept, so no re-calibration is needed."""
        layers = set(layers)
        if not layers:
            return self
        layer_of = self.layer_of()
        is_float = lambda node: layer_of.get(node, node) in layers  # noqa: E731
        writer = {t: n for n, t in self.node_outputs.items()}
        activations = {}
        for name, act in self.activations.items():
            consumers = [e for e in act.consumers if not is_float(e[0])]
            quantized_readers = [e for e in consumers if e[0] not in self.float_nodes]  # not passive float readers
            if quantized_readers or name in self.model_outputs or (act.written and not is_float(writer.get(name, ""))):
                activations[name] = replace(act, consumers=consumers)
        return replace(
            self,
            activations=activations,
            weights=[w for w in self.weights if not is_float(w.node)],
            biases=[b for b in self.biases if not is_float(b.node)],
            constants=[c for c in self.constants if not is_float(c.node)],
            shares={a: kept for a, ms in self.shares.items() if (kept := [m for m in ms if m in activations])},
            fused_nodes={n: h for n, h in self.fused_nodes.items() if not is_float(n)},
            float_nodes={**self.float_nodes, **{n: why for n in self.node_outputs if is_float(n)}},
            quantized_nodes=[n for n in self.quantized_nodes if not is_float(n)],
        )
