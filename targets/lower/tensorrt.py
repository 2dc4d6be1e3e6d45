"""TensorRT (NVIDIA GPU) as an engine: a serialized engine built from the Q/DQ graph, timed with CUDA events.

Explicit quantization: TensorRT reads the scales from the Q/DQ nodes, so no calibrator runs. The
INT8 flag lets the quantized layers run in int8, FP16 (on by default) lets the layers left float
pick half precision; where TensorRT no longer has those flags (strong typing only), the network
is built strongly typed and the Q/DQ and ONNX types decide. Dynamic input dimensions get one
optimisation profile from `--input-shape` (min = opt = max). A timing cache file is read when it
exists and written back, so rebuilding on the same GPU is fast.

Needs `tensorrt` (10+) and `cuda-python`, imported on first use; without them every call is one
line and exit code 3. API facts from TensorRT's Python bindings (python/src/infer/pyCore.cpp,
parsers/pyOnnx.cpp) and NVIDIA's samples/python/common_runtime.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qpasses import graph as graph_io
from qpasses.errors import EngineError, InputError

from . import planned_int8

MISSING = ("--engine tensorrt needs TensorRT 10+ and cuda-python with an NVIDIA GPU "
           "(pip install tensorrt cuda-python); {what} cannot be imported here")


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise EngineError(MISSING.format(what="tensorrt")) from None
    return tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise EngineError(MISSING.format(what="cuda-python")) from None
    return runtime


def _cuda(result: tuple) -> Any:
    """cuda-python returns (error, values...): raise on an error, return the values."""
    err, *values = result
    if int(err) != 0:
        raise EngineError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name() -> str:
    cudart = _cudart()
    props = _cuda(cudart.cudaGetDeviceProperties(_cuda(cudart.cudaGetDevice())))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return f"{name.rstrip(chr(0))} (compute {props.major}.{props.minor})"


@dataclass
class CompileReport:
    engine: str
    input: str
    output: str
    tensorrt: str
    device: str
    strongly_typed: bool
    fp16: bool
    workspace_mib: int
    profiles: dict[str, list[int]] = field(default_factory=dict)
    timing_cache: str | None = None
    integer_nodes: dict[str, int] = field(default_factory=dict)  # engine layers in int8, by layer type
    float_nodes: list[dict] = field(default_factory=list)  # the other layers (engine inspector)
    planned_not_int8: list[dict] = field(default_factory=list)  # planned-int8 ONNX nodes TensorRT ran otherwise
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"schema": "qpass.compile", "version": 1, **asdict(self)}


def compile_model(model_path: Path, output: Path, input_shapes: dict[str, list[int]] | None = None, workspace_mib: int = 1024, fp16: bool = True,
                  timing_cache: Path | None = None) -> CompileReport:
    """Build and write (atomically) a serialized engine for this machine's GPU."""
    trt = _tensorrt()
    model = graph_io.load_model(model_path)  # a readable, valid ONNX file before TensorRT sees it
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = not hasattr(trt.BuilderFlag, "INT8")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {model_path}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for the report
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    profiles = _profile(builder, network, config, input_shapes or {})
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("TensorRT could not build an engine for this model (its log above says why)")
    graph_io.write_all({output: bytes(plan)})
    if timing_cache is not None:
        graph_io.write_all({timing_cache: bytes(config.get_timing_cache().serialize())})
    report = CompileReport("tensorrt", str(model_path), str(output), trt.__version__, gpu_name(), strongly_typed,
                           fp16 and not strongly_typed, workspace_mib, profiles, str(timing_cache) if timing_cache else None)
    _layer_precisions(trt, bytes(plan), logger, report, model)
    return report


def _profile(builder: Any, network: Any, config: Any, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """One optimisation profile fixing every dynamic input dimension; {} when all are static."""
    fixed = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        if tensor.name not in shapes:
            raise InputError(f"input {tensor.name} has dynamic dimensions {shape}: give --input-shape {tensor.name}=...")
        fixed[tensor.name] = shapes[tensor.name]
    if fixed:
        profile = builder.create_optimization_profile()
        for name, shape in fixed.items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
    return fixed


def _layer_precisions(trt: Any, plan: bytes, logger: Any, report: CompileReport, model: onnx.ModelProto) -> None:
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    read_precisions(info, model, report)


def _precision(layer: dict) -> str:
    """A layer's compute precision from the formats of what it reads ("Int8", "FP16", ...), or of
    what it writes when it reads nothing: a convolution after Q/DQ fusion reads int8."""
    names = {"Int8": "Int8", "FP8": "FP8", "Half": "FP16", "FP16": "FP16", "BF16": "BF16", "Float": "FP32", "FP32": "FP32"}
    for side in ("Inputs", "Outputs"):
        formats = [str(t.get("Format/Datatype", "")) for t in layer.get(side, []) if isinstance(t, dict)]
        for word, precision in names.items():
            if any(word in f for f in formats):
                return precision
    return "unknown"


def read_precisions(info: dict, model: onnx.ModelProto, report: CompileReport) -> None:
    """Which engine layers run in int8, from the engine inspector's JSON (DETAILED verbosity), and
    which planned-int8 ONNX nodes TensorRT ran in another precision. Layer names join the ONNX node
    names TensorRT fused into them with " + "."""
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    precision_of: dict[str, str] = {}
    for layer in layers:
        kind, precision = layer.get("LayerType", "?"), _precision(layer)
        if precision == "Int8":
            report.integer_nodes[kind] = report.integer_nodes.get(kind, 0) + 1
        else:
            report.float_nodes.append({"name": layer.get("Name", "?"), "op": kind, "precision": precision})
        for part in str(layer.get("Name", "")).split(" + "):
            precision_of.setdefault(part.strip(), precision)
    for node in planned_int8(model):
        precision = precision_of.get(node.name)
        if precision != "Int8":
            report.planned_not_int8.append({"name": node.name, "op": node.op_type,
                                            "precision": precision or "not found among the engine's layers"})
    if report.planned_not_int8:
        report.warnings.append(f"{len(report.planned_not_int8)} planned-int8 conv/matmul node(s) run in another "
                               "precision: " + ", ".join(f"{n['name']} ({n['precision']})" for n in report.planned_not_int8))


class Runner:
    """A deserialized engine on device buffers of seeded random inputs; a call times one run with CUDA events."""

    def __init__(self, path: Path, threads: int = 0, batch: int = 1, input_shapes: dict[str, list[int]] | None = None,
                 seed: int = 0):
        trt, self.cudart = _tensorrt(), _cudart()
        cudart = self.cudart
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EngineError(f"{path}: TensorRT cannot deserialize it (built by another TensorRT version or GPU?)")
        self.engine, self.context = engine, engine.create_execution_context()
        self.stream = _cuda(cudart.cudaStreamCreate())
        self.start, self.end = _cuda(cudart.cudaEventCreate()), _cuda(cudart.cudaEventCreate())
        rng = np.random.default_rng(seed)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers: dict[str, tuple[int, np.ndarray]] = {}
        for name in self.inputs:
            shape = list((input_shapes or {}).get(name, engine.get_tensor_shape(name)))
            shape = [batch if (i == 0 and d < 0) else d for i, d in enumerate(shape)]
            if any(d < 0 for d in shape):
                raise InputError(f"input {name} has dynamic dimensions {shape}: give --input-shape {name}=...")
            self.context.set_input_shape(name, shape)
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            host = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else np.zeros(shape)).astype(dtype)
            self._bind(name, host)
            _cuda(cudart.cudaMemcpy(self.buffers[name][0], host.ctypes.data, host.nbytes,
                                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        for name in self.outputs:
            self._bind(name, np.empty(tuple(self.context.get_tensor_shape(name)), trt.nptype(engine.get_tensor_dtype(name))))
        self.feeds = {name: self.buffers[name][1] for name in self.inputs}
        self.device = gpu_name()
        self.quantized = True  # an engine built from a Q/DQ graph; compile reports its int8 layers

    def _bind(self, name: str, host: np.ndarray) -> None:
        pointer = _cuda(self.cudart.cudaMalloc(max(host.nbytes, 1)))
        self.context.set_tensor_address(name, int(pointer))
        self.buffers[name] = (int(pointer), host)

    def __call__(self) -> float:
        cudart = self.cudart
        _cuda(cudart.cudaEventRecord(self.start, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT failed to run the engine")
        _cuda(cudart.cudaEventRecord(self.end, self.stream))
        _cuda(cudart.cudaEventSynchronize(self.end))
        return float(_cuda(cudart.cudaEventElapsedTime(self.start, self.end)))

    def results(self) -> list[np.ndarray]:
        """The outputs of the last run, copied to the host."""
        for name in self.outputs:
            pointer, host = self.buffers[name]
            _cuda(self.cudart.cudaMemcpy(host.ctypes.data, pointer, host.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return [self.buffers[name][1] for name in self.outputs]
