"""The quantization plan: which tensors get Q/DQ, for which consumers, sharing which quantizer.

`annotate` writes it from the target's rules, `calibrate` adds ranges and qparams, `insert_qdq`
realises it in the graph, and the report reads it. Nothing in it depends on the ONNX protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qpasses.calibration.qparams import QParams

Edge = tuple[str, int]  # (consumer node name, input index)


@dataclass
class ActivationQuant:
    """One activation tensor read through a Q/DQ pair by the listed consumers."""

    tensor: str
    consumers: list[Edge]
    share: str = ""  # anchor tensor of the quantizer this tensor shares (itself when alone)


@dataclass
class WeightQuant:
    node: str
    op_type: str
    input_index: int
    tensor: str
    axis: int | None  # the per-channel axis, None for per-tensor


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
    shares: dict[str, list[str]] = field(default_factory=dict)  # anchor -> member tensors
    groups: list[list[str]] = field(default_factory=list)  # supergroup instances (node names)
    model_outputs: list[str] = field(default_factory=list)  # graph outputs given a Q/DQ of their own
    fused_nodes: dict[str, str] = field(default_factory=dict)  # node -> head of its supergroup
    float_nodes: dict[str, str] = field(default_factory=dict)  # node -> why it stays float
    quantized_nodes: list[str] = field(default_factory=list)
    calibration_samples: int = 0  # samples the activation observers saw
    ranges: dict[str, tuple] = field(default_factory=dict)  # share anchor -> (lo, hi)
    qparams: dict[str, QParams] = field(default_factory=dict)  # share anchor or weight tensor key

    def quantizer_of(self, tensor: str) -> str:
        """The share anchor whose qparams `tensor` uses."""
        return self.activations[tensor].share or tensor
