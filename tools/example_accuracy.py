"""Float vs int8 accuracy of the bundled example for every shipped target (or those named).

Usage: python tools/example_accuracy.py [TARGET ...]
Prints a Markdown table: top-1 accuracy on examples/digits/eval.npz for the float model, the Q/DQ
model run op by op (the quantization itself), and the Q/DQ model with ONNX Runtime's fused int8
kernels (what ORT on this CPU deploys), plus the output SQNR on the held-back calibration slice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import builtin_names, load_target

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


def accuracy(model: onnx.ModelProto, optimize: bool) -> float:
    data = np.load(EXAMPLE / "eval.npz")
    logits = session(model, optimize).run(None, {"input": data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


def main() -> None:
    targets = sys.argv[1:] or builtin_names()
    float_acc = accuracy(onnx.load(EXAMPLE / "model.onnx"), True)
    print(f"float top-1: {100 * float_acc:.2f}%\n")
    print("| target | int8 top-1 (Q/DQ) | int8 top-1 (ORT fused) | output SQNR dB |")
    print("|---|---|---|---|")
    for name in targets:
        result = quantize(EXAMPLE / "model.onnx", load_target(name), EXAMPLE / "calib.npz", PassContext(quiet=True))
        sqnr = ", ".join(f"{db:.1f}" for db in result.sqnr_db.values())
        print(f"| {name} | {100 * accuracy(result.model, False):.2f}% | {100 * accuracy(result.model, True):.2f}% | {sqnr} |")


if __name__ == "__main__":
    main()
