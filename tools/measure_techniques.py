"""Float vs int8 accuracy for each accuracy-recovery technique alone and combined, per target.

Models: the bundled digits example and two zoo models (tests/models.py: ResNet basic block and
MobileNetV2 inverted residual) trained briefly on scikit-learn's digits (8x8 upsampled to 16x16,
3 channels), so the numbers mean something. Techniques are run as `qpass quantize` runs them:
each is kept only if it does not lower the held-back SQNR, so a row can equal "none".

Usage: python tools/measure_techniques.py [--targets tvm-arm snpe ...] [--settings none adaround brecq ...]
                                         [--workdir /tmp/qpass-techniques]
Prints a Markdown table: top-1 % (Q/DQ simulated) / worst-output SQNR dB. Needs torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext
from qpasses.pipeline import Techniques, quantize
from qpasses.targets import load_target

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from make_example import load_data, train  # noqa: E402
from models import build, export  # noqa: E402

SETTINGS = {
    "none": Techniques(),
    "cle": Techniques(cle=True, cle_replace_relu6=True),
    "bn-recal": Techniques(bn_recal=True),
    "bias (empirical)": Techniques(bias_correction="empirical"),
    "bias (analytic)": Techniques(bias_correction="analytic"),
    "adaround": Techniques(adaround=True),
    "brecq": Techniques(brecq=True),
    "all": Techniques(cle=True, cle_replace_relu6=True, bn_recal=True, bias_correction="empirical", adaround=True),
}
# A user target (one file, no code): academic with 4-bit weights, where rounding choices matter.
W4_TARGET = """extends = "academic"
name = "academic-w4"
summary = "academic with 4-bit per-tensor weights"

[weight]
bits = 4
"""


def digits_16() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train, x_test, y_test = load_data(seed=0)
    up = lambda x: np.repeat(np.repeat(np.repeat(x, 2, axis=2), 2, axis=3), 3, axis=1)  # noqa: E731
    return up(x_train), y_train, up(x_test), y_test


def prepare(workdir: Path) -> dict[str, tuple[Path, Path, Path]]:
    """Each model with its calibration and labeled evaluation files."""
    workdir.mkdir(parents=True, exist_ok=True)
    example = ROOT / "examples" / "digits"
    models = {"digits example": (example / "model.onnx", example / "calib.npz", example / "eval.npz")}
    x_train, y_train, x_test, y_test = digits_16()
    np.savez(workdir / "calib.npz", input=x_train[:400])
    np.savez(workdir / "eval.npz", input=x_test, labels=y_test)
    torch.set_num_threads(1)
    for name in ("resnet_basic", "mobilenetv2_block"):
        path = workdir / f"{name}.onnx"
        if not path.exists():
            model = build(name)
            train(model, x_train, y_train, epochs=15, seed=0)
            export(model, path)
        models[f"{name} (trained)"] = (path, workdir / "calib.npz", workdir / "eval.npz")
    return models


def top1(model: onnx.ModelProto, eval_path: Path, optimize: bool) -> float:
    data = np.load(eval_path)
    name = model.graph.input[0].name
    logits = session(model, optimize).run(None, {name: data["input"]})[0]
    return 100.0 * float((logits.argmax(1) == data["labels"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*", default=["tvm-arm", "snpe", "academic", "tensorrt", "academic-w4"])
    parser.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-techniques"))
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings}
    models = prepare(args.workdir)
    (args.workdir / "academic-w4.toml").write_text(W4_TARGET)
    targets = {t: load_target(args.workdir / f"{t}.toml" if t == "academic-w4" else t) for t in args.targets}
    print("| model | target | float | " + " | ".join(settings) + " |")
    print("|---|---|---|" + "---|" * len(settings))
    for label, (path, calib, evaluation) in models.items():
        float_acc = top1(onnx.load(path), evaluation, True)
        for name, target in targets.items():
            cells = []
            for techniques in settings.values():
                result = quantize(path, target, calib, PassContext(quiet=True), techniques=techniques)
                kept = [d.technique for d in result.decisions if d.kept]
                mark = "" if len(kept) == sum(d.applied for d in result.decisions) else " (kept: " + (", ".join(kept) or "none") + ")"
                cells.append(f"{top1(result.model, evaluation, False):.1f} / {result.score_db:.1f}{mark}")
            print(f"| {label} | {name} | {float_acc:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
