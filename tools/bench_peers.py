"""qpass against its peer ONNX quantizers on the real-model corpus (tools/corpus.toml): one table of
each model's task metric, int8 against float, for four int8 models calibrated on the same data.

    python tools/bench_peers.py [--only NAME ...] [--work DIR] [--out table.md]
                                [--modelopt-python PATH] [--skip-auto]

The calibration and evaluation data are tools/real_models.py's (`build_data`), and every int8 model
is scored as that harness scores it (`score`: run by ONNX Runtime CPU with its optimisations, the
task metric against the float model's outputs on held-out data, and the worst output SQNR):
  qpass           `qpass quantize MODEL --target onnxruntime --data CALIB` (the defaults: minmax)
  qpass --auto    `qpass quantize --auto` to the task's goal (real_models.TASK_GOALS), measured by the
                  task metric itself (real_models.auto_options); `--skip-auto` leaves it out
  ORT             onnxruntime.quantization `quantize_static` after `quant_pre_process`, QDQ,
                  per-channel, reduce_range (tools/bench_latency.py's `ort_quantize_static`), the
                  best of its MinMax, Percentile and Entropy calibrators (each in a child process
                  whose address space is capped at 16 GiB: ORT_MEMORY_BYTES)
  ModelOpt        NVIDIA Model Optimizer ONNX PTQ (`python -m modelopt.onnx.quantization`, int8,
                  fp32 high precision, CPU calibration) run by `--modelopt-python`, the interpreter of
                  its own venv (its onnxruntime-gpu shadows onnxruntime: /work/shared/notes/peers.md),
                  the best of its max and entropy calibrators
"Best" is the highest task metric, ties broken by the worst output SQNR. Each int8 model also gets
the share of all the model's conv/matmul MACs that ONNX Runtime runs in integer kernels
(`int8_coverage(...).model_share`): a tool that keeps most layers float is not compared like for like;
and its ORT latency against the float model's (real_models.latency_ratio: 1 thread, batch 1, runs
interleaved, median of 20; below 1 is faster). A tool that fails (or
ModelOpt without `--modelopt-python`) gets a few words instead of numbers; the VAD (recurrent state
fed as inputs) and the refused model are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from bench_latency import ort_quantize_static  # noqa: E402
from fetch_models import default_cache, fetch, registry  # noqa: E402
from real_models import TASK_GOALS, auto_options, build_data, latency_ratio, qpass, score  # noqa: E402

from qpasses.calibration.runner import check_loads  # noqa: E402
from qpasses.targets.lower.onnxruntime import int8_coverage  # noqa: E402

TOOLS = ("qpass", "qpass --auto", "ORT", "ModelOpt")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
ORT_MEMORY_BYTES = 16 << 30  # address space of the child that runs one ORT calibration
MODELOPT_METHODS = ("max", "entropy")
MODELOPT_TIMEOUT_S = 3600
# task -> (the metric's name, its key in score()'s numbers); the same value real_models.task_value
# gives `qpass quantize --auto --metric`
METRICS = {"detection-yolox": ("detections kept", "kept"), "detection-picodet": ("detections kept", "kept"),
           "ocr-ctc": ("exact text", "exact"), "classifier": ("top-1 agreement", "agreement")}


@dataclass
class Result:
    """One tool's int8 model of one model, scored; or why there is none."""

    metric: float | None = None
    sqnr_db: float | None = None
    choice: str = ""  # the calibrator kept, for the tools that try several
    note: str = ""  # why there is no number
    int8_share: float | None = None  # of all the model's conv/matmul MACs, in ORT's integer kernels
    latency: float | None = None  # ORT int8 / float, 1 thread

    def key(self) -> tuple[float, float]:
        """What picks a tool's best calibrator: the task metric, then the worst output SQNR."""
        return (-1.0 if self.metric is None else self.metric, -np.inf if self.sqnr_db is None else self.sqnr_db)


def scored(entry: dict, model: Path, int8: Path, evals, choice: str = "") -> Result:
    """The int8 model's task metric (1.0 when the float model finds nothing to lose), worst SQNR, int8
    share and latency ratio."""
    _, worst, numbers = score(entry, model, int8, evals)
    value = numbers[METRICS[entry["task"]][1]]
    share = int8_coverage(onnx.load(int8)).model_share
    x = evals[0] if entry["task"] == "classifier" else evals
    return Result(1.0 if value is None else float(value), worst, choice, int8_share=share,
                  latency=latency_ratio(model, int8, entry["input"], x))


def last_line(text: str, default: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:100] if lines else default


def best(results: list[Result]) -> Result:
    """The best scored result; with none scored, the failures' reasons."""
    ok = [r for r in results if r.metric is not None]
    if ok:
        return max(ok, key=Result.key)
    notes = list(dict.fromkeys(r.note for r in results))
    return Result(note=notes[0] if len(notes) == 1 else "; ".join(f"{r.choice}: {r.note}" for r in results))


# --- the four tools --------------------------------------------------------------------------------

def run_qpass(name: str, entry: dict, model: Path, calib: Path, evals, work: Path, auto: bool) -> Result:
    """`qpass quantize` with its defaults, or `--auto` to the task goal (a goal --auto cannot meet is an
    answer: it writes its best model, which is scored); --auto's choice is read from its report."""
    int8, record = work / f"{name}.{'auto' if auto else 'qpass'}.onnx", work / f"{name}.auto.json"
    options = [*auto_options(name, entry, model, work), "--report", str(record)] if auto else ["--target", "onnxruntime"]
    code, err, _, _ = qpass("quantize", str(model), *options, "--data", str(calib), "-o", str(int8), "--force", "--quiet")
    missed = auto and code == 1 and "--auto: no setting met the goal" in last_line(err, "")
    if code != 0 and not missed:
        return Result(note=f"exit {code}: {last_line(err, '')}")
    try:
        return scored(entry, model, int8, evals, auto_choice(record, missed) if auto else "minmax")
    except Exception as exc:  # noqa: BLE001  one model ORT cannot run is a cell, not the end of the table
        return Result(note=f"{type(exc).__name__}: {last_line(str(exc), '')}")


def auto_choice(record: Path, missed: bool) -> str:
    """The setting --auto chose (calibrator, techniques, float layers), from its --report."""
    found = json.loads(record.read_text())["auto"]
    trial = found["trials"][found["chosen"]]
    layers = [f"{len(trial['float_layers'])} float layers"] if trial["float_layers"] else []
    return ", ".join([trial["calibration"], *trial["techniques"], *layers]) + ("; goal not met" if missed else "")


def ort_in_child(model: Path, calib: Path, int8: Path, method: str, work: Path) -> None:
    """quantize_static in this (child) process, its memory capped: ORT's histogram calibrators keep
    every intermediate tensor of every sample (24 GB on the 800x608 layout detector, and the OOM
    killer took the whole benchmark). Its progress goes to stderr (stdout is the table's), and the
    augmented models it writes to the working directory go to the work directory."""
    resource.setrlimit(resource.RLIMIT_AS, (ORT_MEMORY_BYTES, ORT_MEMORY_BYTES))
    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    with contextlib.redirect_stdout(sys.stderr), contextlib.chdir(work):
        ort_quantize_static(model, arrays, int8, method)


def run_ort(name: str, entry: dict, model: Path, calib: Path, evals, work: Path) -> Result:
    """onnxruntime.quantization's quantize_static, each calibrator in turn; the best is kept."""
    results = []
    for method in ORT_METHODS:
        int8 = work / f"{name}.ort-{method}.onnx"
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
                child.submit(ort_in_child, model, calib, int8, method, work).result()
            check_loads(onnx.load(int8), "its output")
            results.append(scored(entry, model, int8, evals, method))
        except Exception as exc:  # noqa: BLE001  a peer's failure is a cell of the table
            results.append(Result(choice=method, note=f"{type(exc).__name__}: {last_line(str(exc), '')}"))
        report(name, "ORT", results[-1])
    return best(results)


def modelopt_shapes(calib: Path) -> str:
    """--calibration_shapes / --override_shapes for ModelOpt: every input at batch 1, its other
    dimensions the calibration data's (a dynamic width becomes the width calibrated and scored)."""
    with np.load(calib) as data:
        return ",".join(f"{k}:" + "x".join(str(d) for d in (1, *data[k].shape[1:])) for k in data.files)


def run_modelopt(name: str, entry: dict, model: Path, calib: Path, evals, work: Path, python: Path | None) -> Result:
    """Model Optimizer's ONNX PTQ through its own interpreter, max and entropy calibration; the best is kept."""
    if python is None:
        return Result(note="not run (no --modelopt-python)")
    executable = shutil.which(str(python))
    if executable is None:
        return Result(note=f"not run ({python} is not an executable)")
    shapes = modelopt_shapes(calib)
    results = []
    for method in MODELOPT_METHODS:
        int8 = work / f"{name}.modelopt-{method}.onnx"
        int8.unlink(missing_ok=True)
        command = [executable, "-m", "modelopt.onnx.quantization", "--onnx_path", str(model.resolve()), "--quantize_mode",
                   "int8",
                   "--calibration_method", method, "--calibration_data_path", str(calib),
                   "--calibration_shapes", shapes, "--override_shapes", shapes, "--calibration_eps", "cpu",
                   "--high_precision_dtype", "fp32", "--output_path", str(int8)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=MODELOPT_TIMEOUT_S, cwd=work)
        except subprocess.TimeoutExpired:
            results.append(Result(choice=method, note=f"timed out after {MODELOPT_TIMEOUT_S} s"))
            report(name, "ModelOpt", results[-1])
            continue
        (work / f"{name}.modelopt-{method}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not int8.exists():
            results.append(Result(choice=method, note=f"exit {done.returncode}: {last_line(done.stderr, 'no output')}"))
        else:
            try:
                results.append(scored(entry, model, int8, evals, method))
            except Exception as exc:  # noqa: BLE001  e.g. a model ORT CPU cannot load
                results.append(Result(choice=method, note=f"{type(exc).__name__}: {last_line(str(exc), '')}"))
        report(name, "ModelOpt", results[-1])
    return best(results)


def report(name: str, tool: str, r: Result) -> None:
    text = f"{r.metric:.3f}, SQNR {r.sqnr_db:.1f} dB" if r.metric is not None else f"FAILED {r.note}"
    print(f"{name:18s} {tool:10s} {r.choice:12s} {text}", file=sys.stderr, flush=True)


def run_model(name: str, entry: dict, model: Path, work: Path, modelopt: Path | None, skip_auto: bool) -> dict[str, Result]:
    calib, evals = build_data(name, entry, model, work)
    results = {"qpass": run_qpass(name, entry, model, calib, evals, work, auto=False)}
    report(name, "qpass", results["qpass"])
    if skip_auto:
        results["qpass --auto"] = Result(note="skipped (--skip-auto)")
    else:
        results["qpass --auto"] = run_qpass(name, entry, model, calib, evals, work, auto=True)
        report(name, "qpass auto", results["qpass --auto"])
    results["ORT"] = run_ort(name, entry, model, calib, evals, work)
    results["ModelOpt"] = run_modelopt(name, entry, model, calib, evals, work, modelopt)
    return results


# --- the table -------------------------------------------------------------------------------------

def cells(r: Result) -> list[str]:
    """Setting, task metric, SQNR, int8 MACs and latency of one tool's result; a failure's reason."""
    if r.metric is None:
        return [r.note.replace("|", "\\|"), "", "", "", ""]
    return [r.choice, f"{r.metric:.3f}", f"{r.sqnr_db:.1f}", f"{100 * r.int8_share:.0f}%", f"{r.latency:.2f}"]


def table(rows: dict[str, tuple[dict, dict[str, Result]]]) -> str:
    """One row per model and tool."""
    lines = ["| model | task metric (goal) | tool | setting | metric | worst SQNR dB | int8 MACs | ORT int8/float |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (entry, results) in rows.items():
        metric = f"{METRICS[entry['task']][0]} ({TASK_GOALS[entry['task']]:.2f})"
        for tool in TOOLS:
            lines.append(f"| {name} | {metric} | {tool} | " + " | ".join(cells(results[tool])) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="registry names (default: every model with one image input)")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--work", type=Path, help="where data and int8 models go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    parser.add_argument("--modelopt-python", type=Path, help="the python of a venv with nvidia-modelopt[onnx]")
    parser.add_argument("--skip-auto", action="store_true", help="leave out qpass --auto (the slow column)")
    args = parser.parse_args(argv)
    entries = {n: e for n, e in registry(args.only).items() if e["task"] in METRICS}
    if not entries:
        raise SystemExit("bench_peers: no model with one image input among those named")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        for name, entry in entries.items():
            results = run_model(name, entry, fetch(name, entry, args.cache), work, args.modelopt_python, args.skip_auto)
            rows[name] = (entry, results)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
