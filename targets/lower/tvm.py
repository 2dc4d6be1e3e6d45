"""TVM (Relax) as an engine: a Q/DQ ONNX model becomes a shared library with integer kernels.

`compile_model` imports the model with TVM's ONNX frontend, runs qpass's integer lowering
(`tvm_passes`) and CPU schedules (`tvm_schedule`), builds for the target file's `[tvm]` device
(LLVM target, and a cross compiler for boards) and writes the library with a sidecar
`<library>.json` that records the inputs (names, shapes, dtypes) and the compile report: a
library alone does not say what it expects.

`Runner` loads a library here, or on a board through RPC (`tvm_rpc`), and times `main` with TVM's
time_evaluator, one sample per call, so `qpasses.bench.measure` can interleave it with another
artifact.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from qpasses import graph as graph_io
from qpasses.bench import cpu_description, seeded_inputs, static_shapes
from qpasses.errors import EngineError, InputError, UnsupportedModelError
from qpasses.targets import load_target
from qpasses.targets.lower import planned_int8, sidecar

try:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
except ImportError:  # pragma: no cover - apache-tvm is a dependency; say so in one line if it is missing
    raise EngineError("TVM is not installed: pip install apache-tvm==0.27.0.post1") from None

from .tvm_onnx import importable, op_types
from .tvm_passes import KERNELS, float_ops, integer_lowering
from .tvm_rpc import RemoteDevice, last_line, set_threads
from .tvm_dot import KERNELS as DOT_KERNELS, count_fitting
from .tvm_schedule import exact_float_plan, int_kernel_for, schedule_cpu

ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm"}


@dataclass
class CompileReport:
    engine: str
    input: str
    output: str
    target: str
    llvm: dict
    tvm: str
    machine: str  # the architecture the library runs on
    inputs: list[dict] = field(default_factory=list)  # {name, shape, dtype}
    planned_int8: int = 0  # conv/gemm/matmul nodes the Q/DQ model plans in int8 (a dequantized weight)
    integer_nodes: dict[str, int] = field(default_factory=dict)  # "conv2d int8 x int8 -> int32": count
    float_nodes: list[dict] = field(default_factory=list)  # {name: Relax variable, op}: compute left in float32
    int_kernel: str = "integer"  # how integer convs run: int32 multiplies, dot products, or exact float32 FMA
    dot_layers: int = 0  # with a dot-product int_kernel (pmaddwd, vnni512, ...): the integer convs and matmuls on it
    exact_float_convs: int = 0  # int8 convs on float32 FMA: all that fit (float-exact), else those a dot kernel leaves
    build_seconds: float = 0.0  # schedule + build + link
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"schema": "qpass.compile", "version": 1, **asdict(self)}


def compile_model(model_path: Path, output: Path, target: str = "tvm-x86", input_shapes: dict | None = None,
                  mcpu: str | None = None, mattr: str | None = None, int_kernel: str = "auto",
                  quiet: bool = True) -> CompileReport:
    """Build `model_path` for the target file's TVM device into `output` (atomically) plus `output`.json."""
    if output.suffix != ".so":  # TVM's export_library reads .tar as an object archive, .so as a library
        raise InputError(f"{output}: qpass writes the TVM module as a shared library: name it *.so "
                         f"(not {output.suffix or 'no suffix'})")
    device = load_target(target).tvm
    if device is None:
        raise InputError(f"target {target} has no [tvm] device table: use tvm-x86 or tvm-arm, or add one to the file")
    llvm = llvm_config(device.llvm, mcpu, mattr)
    llvm_target = tvm.target.Target(llvm)
    try:
        int_kernel = int_kernel_for(int_kernel, llvm_target)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    with tqdm(total=4, desc="compile: import", unit="stage", disable=True if quiet else None, leave=False) as stages:
        model = graph_io.load_model(model_path)
        inputs = static_inputs(model, input_shapes or {})
        lowered = lower(model, inputs)
        report = CompileReport("tvm", str(model_path), str(output), target, llvm, tvm.__version__,
                               _machine(llvm), inputs=inputs, int_kernel=int_kernel)
        report.planned_int8 = len(planned_int8(model))
        _describe(lowered, report)
        if int_kernel in DOT_KERNELS:
            report.dot_layers = count_fitting(lowered, DOT_KERNELS[int_kernel])
            report.exact_float_convs = exact_float_plan(lowered, DOT_KERNELS[int_kernel])[0]
        if int_kernel == "float-exact":
            report.exact_float_convs, kept = exact_float_plan(lowered)
            if kept:
                report.warnings.append(f"{kept} int8 conv(s) keep the integer kernel: their sums can pass 2^24, "
                                       "beyond float32's exact integers")
        start = time.perf_counter()
        _stage(stages, "schedule")
        try:
            scheduled = schedule_cpu(lowered, llvm_target, int_kernel)
            _stage(stages, "build")
            executable = tvm.compile(scheduled, target=llvm_target)
        except Exception as exc:
            raise EngineError(f"TVM build failed: {last_line(exc)}") from None
        report.build_seconds = round(time.perf_counter() - start, 3)
        _stage(stages, "link")
        _export(executable, output, device.cross_compiler)
        _stage(stages, "done")
    graph_io.write_all({sidecar(output): json.dumps(report.to_json(), indent=2, sort_keys=True).encode()})
    return report


def llvm_config(base: dict, mcpu: str | None = None, mattr: str | None = None) -> dict:
    """A target file's LLVM table with `--mcpu`/`--mattr` applied; mcpu "native" is LLVM's name for
    this machine's CPU, with the instructions it implies."""
    llvm = dict(base)
    if mcpu:
        llvm["mcpu"] = tvm.target.codegen.llvm_get_system_cpu() if mcpu == "native" else mcpu
    if mattr:
        llvm["mattr"] = [a.strip() for a in mattr.split(",") if a.strip()]
    return llvm


def _stage(bar: tqdm, name: str) -> None:
    bar.update(1)
    bar.set_description(f"compile: {name}")


def static_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> list[dict]:
    """The library's fixed inputs: a dynamic batch becomes 1, other dynamic dims need --input-shape."""
    return [{"name": name, "shape": shape, "dtype": str(dtype)}
            for name, (shape, dtype) in static_shapes(model, shapes).items()]


def lower(model: onnx.ModelProto, inputs: list[dict]) -> tvm.IRModule:
    """The Relax module `compile_model` builds: the imported model after qpass's integer lowering.

    `If` on shapes and LSTM are first rewritten into ops the frontend has (`tvm_onnx`). A valid
    model that it still cannot take (an op it has no converter for, an `If` on input values, or a
    shape it cannot resolve) is an unsupported model for this engine, not an engine crash."""
    model = importable(model, {i["name"]: i["shape"] for i in inputs})
    missing = sorted(unsupported_ops(model))
    if missing:
        raise UnsupportedModelError(f"TVM's ONNX frontend has no converter for {', '.join(missing)}: this model "
                                    "cannot be compiled for TVM (ONNX Runtime runs it: --engine onnxruntime)")
    try:
        mod = from_onnx(model, shape_dict={i["name"]: i["shape"] for i in inputs},
                        dtype_dict={i["name"]: i["dtype"] for i in inputs}, keep_params_in_input=False)
    except Exception as exc:
        raise UnsupportedModelError(f"TVM's ONNX frontend cannot import the model: {last_line(exc)}") from None
    return integer_lowering()(mod)


def unsupported_ops(model: onnx.ModelProto) -> set[str]:
    """Op types in the model (subgraphs included) that TVM's ONNX frontend cannot convert."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    return {op for domain, op in op_types(model.graph) if domain in ("", "ai.onnx") and op not in known}


def _describe(mod: tvm.IRModule, report: CompileReport) -> None:
    """Count conv/matmul kernels by operand dtypes, and list the compute the lowering left in float."""
    integer: dict[str, int] = {}
    for name, op, call, dtype in float_ops(mod, with_kernels=True):
        if op in KERNELS and not str(call.args[0].ty.dtype).startswith("float"):
            x, w = (str(a.ty.dtype) for a in call.args[:2])
            key = f"{op.removeprefix('relax.').removeprefix('nn.')} {x} x {w} -> {dtype}"
            integer[key] = integer.get(key, 0) + 1
        elif dtype.startswith("float"):
            report.float_nodes.append({"name": name, "op": op.removeprefix("relax.")})
    report.integer_nodes = dict(sorted(integer.items()))
    kernels = [n for n in report.float_nodes if "relax." + n["op"] in (*KERNELS, "relax.nn.conv2d_transpose")]
    integer = sum(report.integer_nodes.values())
    if report.planned_int8 > integer:
        report.warnings.append(f"{report.planned_int8 - integer} of {report.planned_int8} planned-int8 conv/matmul "
                               "node(s) run float32 kernels (a form the lowering does not handle): "
                               + ", ".join(f"{n['name']} ({n['op']})" for n in kernels[:5]))
    elif kernels:
        report.warnings.append(f"{len(kernels)} conv/matmul kernel(s) stay float32 (no Q/DQ around them)")


def _machine(llvm: dict) -> str:
    triple = llvm.get("mtriple", "")
    return triple.split("-")[0] if triple else platform.machine()


def _export(executable, output: Path, cross_compiler: str) -> None:
    """Link the library beside `output` under a temporary name, then rename it into place."""
    from tvm.support import cc

    with graph_io.writing(output):
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".so")
        os.close(fd)
    try:
        fcompile = cc.cross_compiler(cross_compiler) if cross_compiler else None
        executable.export_library(tmp, fcompile=fcompile)
        os.chmod(tmp, graph_io.umask_mode(0o777))  # as the linker gives a library it creates
        os.replace(tmp, output)
    except Exception as exc:
        hint = f" (is {cross_compiler} installed? Debian: gcc-aarch64-linux-gnu)" if cross_compiler else ""
        raise EngineError(f"linking {output.name} failed: {last_line(exc)}{hint}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def elf_machine(path: Path) -> str:
    """The architecture an ELF shared library was built for (e_machine)."""
    with open(path, "rb") as f:
        head = f.read(20)
    code = int.from_bytes(head[18:20], "little")
    return ELF_MACHINES.get(code, f"machine {code:#x}")


def read_sidecar(library: Path) -> dict:
    path = sidecar(library)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path} is missing or unreadable: it records the library's inputs; "
                         "keep it beside the library (qpass compile writes both)") from None


class Runner:
    """A compiled library loaded on this CPU or, with `remote`, on a board through RPC.

    A call is one sample of TVM's time_evaluator measured on the device: the mean of `number`
    runs, repeated until `min_repeat_ms` have passed; `cooldown_ms` of idle precede each sample.
    """

    def __init__(self, path: Path, threads: int = 0, batch: int = 1, input_shapes: dict | None = None, seed: int = 0,
                 remote: RemoteDevice | None = None, number: int = 1, min_repeat_ms: int = 0, cooldown_ms: int = 0):
        info = read_sidecar(path)
        self.quantized = bool(info.get("integer_nodes"))
        self.feeds = feeds(info["inputs"], batch, seed)
        self.cooldown = cooldown_ms / 1000.0
        built_for = elf_machine(path)
        if remote is None:
            self.step = _local
            if built_for != platform.machine():
                raise EngineError(f"{path} is built for {built_for}; this machine is {platform.machine()} "
                                  "(run it on a board with --rpc)")
            self.device, dev = cpu_description(), tvm.cpu()
            library = self.step(lambda: tvm.runtime.load_module(str(path)), f"TVM cannot load {path}")
            if threads:
                set_threads(threads)
        else:
            if remote.machine and remote.machine != built_for:
                raise EngineError(f"{path} is built for {built_for}; the board at {remote.endpoint} is {remote.machine}")
            if threads:
                remote.set_threads(threads)
            self.step, session = remote.step, remote.session
            self.device, dev = remote.description, session.cpu(0)
            name = f"qpass-{uuid.uuid4().hex[:8]}-{path.name}"  # a comparison's two files never collide
            self.step(lambda: session.upload(str(path), target=name), f"uploading {path.name}")
            library = self.step(lambda: session.load_module(name), f"{path.name} (built for {built_for}) does not load")
        self.vm = self.step(lambda: relax.VirtualMachine(library, dev), "starting the VM")
        self.dev = dev
        self.args = self._copy(self.feeds)
        self.evaluate = self.vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=min_repeat_ms)

    def __call__(self) -> float:
        if self.cooldown:
            time.sleep(self.cooldown)
        return 1000.0 * float(self.step(lambda: self.evaluate(*self.args), "TVM run failed").mean)

    def outputs(self, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """The library's outputs for `feeds` (every input by name, in the compiled shapes), or for the seeded inputs."""
        args = self.args if feeds is None else self._copy(feeds)
        result = self.step(lambda: self.vm["main"](*args), "TVM run failed")
        items = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return self.step(lambda: [item.numpy() for item in items], "copying outputs")


    def _copy(self, feeds: dict[str, np.ndarray]) -> list:
        return self.step(lambda: [tvm.runtime.tensor(np.asarray(feeds[name], order="C"), self.dev) for name in self.feeds],
                         "copying inputs")


def _local(call, what: str):
    try:
        return call()
    except Exception as exc:
        raise EngineError(f"{what}: {last_line(exc)}") from None


def feeds(inputs: list[dict], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the compiled shapes (the library is static: `--batch-size` must match)."""
    for spec in inputs:
        if batch != 1 and spec["shape"] and spec["shape"][0] != batch:
            raise InputError(f"the library was compiled for {spec['name']} of shape {spec['shape']}; "
                             f"compile with --input-shape {spec['name']}={batch}x... for batch {batch}")
    return seeded_inputs({s["name"]: (s["shape"], np.dtype(s["dtype"])) for s in inputs}, seed)
