"""Instructions per multiply-add of the TVM engine's ARM dot-product kernels, read from the assembly.

    python tools/arm_asm.py [--models resnet18-224 ...] [--workdir DIR] [--mattr +neon,+dotprod]

Time under qemu means nothing, so this counts instead: each model is quantized for `tvm-arm` (as
tools/bench_tvm.py does for x86), lowered and scheduled with the `sdot` kernel and compiled for
aarch64 (no board needed; the library is not linked). In each kernel's assembly the basic blocks
that hold `sdot` instructions are its inner loops; per kernel this prints the instructions of its
hottest block (the one with the most `sdot`s), how many are `sdot` (16 int8 multiply-adds each:
4 lanes x 4 products), loads and other instructions, and multiply-adds per instruction. A
register-resident tile shows as mostly `sdot`s with one broadcast load per group of 4 inputs and
one weight load per 16 output channels.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import tvm

from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower import tvm as tvm_engine
from qpasses.targets.lower.tvm_schedule import schedule_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import source_and_calibration  # noqa: E402

MACS_PER_SDOT = 16  # 4 int32 lanes x 4 int8 products
LABEL = re.compile(r"^([.\w$]+):")
FUNCTION = re.compile(r"^\s*\.type\s+([\w$.]+),\s*@function")
LAMBDA = re.compile(r"\.L__tvm_parallel_lambda[.\d]*")


def kernel_blocks(asm: str) -> dict[str, list[str]]:
    """Per kernel: the mnemonics of its block with the most `sdot`s. A parallel kernel's loop is in
    a `__tvm_parallel_lambda` function, named here after the function that launches it."""
    hottest: dict[str, list[str]] = {}
    launched_by: dict[str, str] = {}
    function, block = "", []

    def close() -> None:
        if block.count("sdot") > hottest.get(function, []).count("sdot"):
            hottest[function] = list(block)

    for line in asm.splitlines():
        if match := FUNCTION.match(line):
            close()
            function, block = match.group(1), []
        elif LABEL.match(line):
            close()
            block = []
        elif line.startswith(("\t", " ")) and (text := line.strip()) and not text.startswith((".", "//", "@")):
            block.append(text.split()[0])
            for lambda_name in LAMBDA.findall(text):
                launched_by.setdefault(lambda_name, function)
    close()
    return {launched_by.get(name, name): mnemonics for name, mnemonics in hottest.items()}


def describe(mnemonics: list[str]) -> dict[str, float]:
    counts = Counter("sdot" if m == "sdot" else "load" if m.startswith("ld") else "other" for m in mnemonics)
    total = len(mnemonics)
    return {"instructions": total, "sdot": counts["sdot"], "loads": counts["load"], "other": counts["other"],
            "macs_per_instruction": MACS_PER_SDOT * counts["sdot"] / total if total else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["example", "resnet18-224"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-arm-asm"))
    parser.add_argument("--mattr", default="+neon,+dotprod")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    llvm = tvm_engine.llvm_config(load_target("tvm-arm").tvm.llvm, None, args.mattr)
    target = tvm.target.Target(llvm)
    print(f"LLVM target {llvm}; kernel sdot; the hottest block of each kernel\n")
    print("| model | kernel | instructions | sdot | loads | other | MACs per instruction |\n|---|---|---|---|---|---|---|")
    for name in args.models:
        source, calib, _ = source_and_calibration(name, args.workdir)
        model = quantize(source, load_target("tvm-arm"), calib, PassContext(quiet=True)).model
        with np.load(calib) as data:
            shapes = {k: [1, *data[k].shape[1:]] for k in data.files}
        lowered = tvm_engine.lower(model, tvm_engine.static_inputs(model, shapes))
        executable = tvm.compile(schedule_cpu(lowered, target, "sdot"), target=target)
        blocks = kernel_blocks(executable.mod.imports[0].inspect_source("asm"))
        for kernel, mnemonics in sorted(blocks.items()):
            row = describe(mnemonics)
            print(f"| {name} | {kernel} | {row['instructions']} | {row['sdot']} | {row['loads']} | {row['other']} | "
                  f"{row['macs_per_instruction']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
