"""Run qpass on the real-model corpus (tools/corpus.toml) and score every int8 model with the metric a
user of that model cares about, against the float model on held-out real data.

    python tools/real_models.py [--ci] [--only NAME ...] [--adaround] [--out table.md] [--work DIR]

For each model: `qpass quantize` for every shipped target (minmax), every calibrator and the
techniques on the onnxruntime target, `qpass check` of each output, `qpass compile` of the
onnxruntime int8 model for ONNX Runtime and TVM (x86, aarch64; the x86 library is run and scored
too), `qpass analyze --fallback` to a
30 dB worst-output SQNR (its wall time is the analysis speed), `qpass quantize --auto` to the
task's goal (TASK_GOALS) measured by the task metric itself (`--metric`, on data the table does not
score: auto_options; not in --ci), and a float-vs-int8 evaluation
(int8 run by ONNX Runtime with its optimisations, as deployed):
  detectors   the fraction of float detections kept (same class, IoU >= 0.5, score above the package's threshold)
  OCR         exact text agreement and character error rate against the float model's text
  classifier  top-1 agreement with the float model
  VAD         per-frame speech decision agreement (each model carries its own recurrent state)
plus the worst output SQNR, quantize wall time and peak RSS, and for the onnxruntime row ORT
int8/float latency (1 thread, batch 1, runs interleaved). `--ci` runs the models marked `ci` with
fewer configurations (CI's time limit); exit 1 when a run fails, a model does not conform, or a
refused model is not refused with one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
import corpus_data  # noqa: E402
from fetch_models import default_cache, fetch, registry  # noqa: E402

from qpasses.targets import builtin_names  # noqa: E402
from qpasses.targets.lower.onnxruntime import int8_coverage  # noqa: E402

CALIBRATORS = ("minmax", "quantile", "mse", "kl", "norm", "meanstd")
TECHNIQUES = (("--cle",), ("--smoothquant",), ("--bn-recal",), ("--bias-correction",), ("--bias-correction", "analytic"))
AUTO = "onnxruntime --auto (task goal)"


@dataclass
class Row:
    model: str
    config: str
    exit_code: int
    conforms: bool | None = None
    metric: str = ""
    sqnr_db: float | None = None
    seconds: float = 0.0
    peak_mib: float = 0.0
    latency_ratio: float | None = None
    int8_coverage: float | None = None  # share of planned int8 conv/matmul MACs ORT runs in integer kernels
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.conforms is not False


def configs(ci: bool, adaround: bool) -> list[tuple[str, list[str]]]:
    """(label, qpass quantize options) per row."""
    if ci:
        return [("onnxruntime minmax", ["--target", "onnxruntime"]), ("tensorrt minmax", ["--target", "tensorrt"]),
                ("onnxruntime kl", ["--target", "onnxruntime", "--calib", "kl"]),
                ("onnxruntime --bias-correction", ["--target", "onnxruntime", "--bias-correction"])]
    rows = [(f"{t} minmax", ["--target", t]) for t in builtin_names()]
    rows += [(f"onnxruntime {c}", ["--target", "onnxruntime", "--calib", c]) for c in CALIBRATORS[1:]]
    rows += [(f"onnxruntime {' '.join(t)}", ["--target", "onnxruntime", *t]) for t in TECHNIQUES]
    if adaround:
        rows.append(("onnxruntime --adaround", ["--target", "onnxruntime", "--adaround"]))
    rows.append((AUTO, []))  # its options depend on the model: auto_options
    return rows


# --- data ------------------------------------------------------------------------------------------

def float_session(model: onnx.ModelProto | str, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def vad_feeds(model_path: Path, audio: np.ndarray) -> dict[str, np.ndarray]:
    """Windows with the state the float model carries into each: whole feeds for calibration."""
    sess = float_session(str(model_path))
    chunks = corpus_data.windows(audio)
    state = np.zeros((2, 1, 128), np.float32)
    states = []
    for chunk in chunks:
        states.append(state)
        _, state = sess.run(None, {"input": chunk[None], "state": state, "sr": np.array(16000, np.int64)})
    return {"input": chunks.astype(np.float32), "state": np.stack(states), "sr": np.full(len(chunks), 16000, np.int64)}


def build_data(name: str, entry: dict, model_path: Path, work: Path) -> tuple[Path, object]:
    """Write the calibration .npz; return it and the evaluation data."""
    calib_path = work / f"{name}.calib.npz"
    task = entry["task"]
    if entry.get("data") == "documents":
        np.savez(calib_path, **{entry["input"]: corpus_data.document_pages(entry, 48, seed=1, evaluation=False)})
        return calib_path, corpus_data.document_pages(entry, 32, seed=2, evaluation=True)
    if task in ("detection-yolox", "detection-picodet", "classifier"):
        calib, evals = corpus_data.image_split(entry)
        if task == "classifier":
            labels = None
            if entry.get("rotations"):
                calib, _ = corpus_data.rotations(calib)
                evals, labels = corpus_data.rotations(evals)
            evals = (evals, labels)
        np.savez(calib_path, **{entry["input"]: calib})
        return calib_path, evals
    if task == "ocr-ctc":
        np.savez(calib_path, **{entry["input"]: corpus_data.text_images(entry, 48, seed=1)})
        return calib_path, corpus_data.text_images(entry, 144, seed=2)  # 48 lines told 0.75 from 0.85 poorly
    if task == "vad":
        np.savez(calib_path, **vad_feeds(model_path, corpus_data.speech(1, corpus_data.CALIBRATION_PHRASES)))
        return calib_path, corpus_data.speech(2, corpus_data.EVALUATION_PHRASES)
    raise SystemExit(f"real_models: {name}: unknown task {task!r}")


# --- task metrics ----------------------------------------------------------------------------------

def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box [4] against boxes [n, 4] (x1, y1, x2, y2)."""
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order, keep = list(np.argsort(-scores)), []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            overlap = iou(boxes[i], boxes[order])
            order = [j for j, o in zip(order, overlap) if o <= threshold]
    return keep


def yolox_detections(out: list[np.ndarray], entry: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """ddddocr's decode: grid offsets and strides 8/16/32, score = objectness * class, NMS 0.45."""
    h, w = entry["size"]
    grids, strides = [], []
    for s in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(w // s), np.arange(h // s))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    result = []
    for pred in out[0]:
        xy, wh = (pred[:, :2] + grid) * stride, np.exp(pred[:, 2:4]) * stride
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
        scores = pred[:, 4:5] * pred[:, 5:]
        cls, best = scores.argmax(1), scores.max(1)
        mask = best > entry["threshold"]
        keep = nms(boxes[mask], best[mask], 0.45)
        result.append((boxes[mask][keep], best[mask][keep], cls[mask][keep]))
    return result


def picodet_detections(out: list[np.ndarray], entry: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """rapid_layout's PicoDet decode: distribution-to-distance boxes per stride, per-class NMS 0.5."""
    h, w = entry["size"]
    n = len(out) // 2
    result = []
    for b in range(out[0].shape[0]):
        boxes, scores = [], []
        for stride, score, dist in zip((8, 16, 32, 64), out[:n], out[n:]):
            ww, hh = np.meshgrid(np.arange(np.ceil(w / stride)), np.arange(np.ceil(h / stride)))
            centre = np.stack([(ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride] * 2, 1)
            d = dist[b].reshape(-1, dist.shape[-1] // 4)
            d = np.exp(d - d.max(1, keepdims=True))
            d = (d / d.sum(1, keepdims=True) * np.arange(d.shape[1])).sum(1).reshape(-1, 4) * stride
            boxes.append(centre[:len(d)] + np.array([-1, -1, 1, 1]) * d)
            scores.append(score[b])
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        kept_boxes, kept_scores, kept_cls = [], [], []
        for c in range(scores.shape[1]):
            mask = scores[:, c] > entry["threshold"]
            keep = nms(boxes[mask], scores[mask, c], 0.5)[:100]
            kept_boxes.append(boxes[mask][keep])
            kept_scores.append(scores[mask, c][keep])
            kept_cls.append(np.full(len(keep), c))
        result.append((np.concatenate(kept_boxes), np.concatenate(kept_scores), np.concatenate(kept_cls)))
    return result


def kept_fraction(ref: list, got: list) -> tuple[float | None, int]:
    """Float detections matched by an int8 detection of the same class with IoU >= 0.5."""
    total = kept = 0
    for (rb, _, rc), (gb, _, gc) in zip(ref, got):
        used = np.zeros(len(gb), bool)
        for box, c in zip(rb, rc):
            total += 1
            candidates = np.where((gc == c) & ~used)[0]
            if len(candidates):
                overlap = iou(box, gb[candidates])
                if overlap.max() >= 0.5:
                    used[candidates[overlap.argmax()]] = True
                    kept += 1
    return (kept / total if total else None), total


def ctc_text(out: np.ndarray, entry: dict) -> list[tuple[int, ...]]:
    """Greedy CTC of [T, N, C] logits ([N, T, C] with `ctc = "NTC"`): argmax, collapse repeats, drop
    the blank (0)."""
    texts = []
    best = out.argmax(-1)
    for seq in (best if entry.get("ctc") == "NTC" else best.T):
        collapsed = [int(c) for i, c in enumerate(seq) if c != 0 and (i == 0 or c != seq[i - 1])]
        texts.append(tuple(collapsed))
    return texts


def edit_distance(a: tuple, b: tuple) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def run_batches(sess: ort.InferenceSession, name: str, x: np.ndarray, fixed: bool) -> list[np.ndarray]:
    if not fixed:
        return sess.run(None, {name: x})
    parts = [sess.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([p[k] for p in parts], axis=1 if parts[0][k].ndim == 3 and parts[0][k].shape[1] == 1 else 0)
            for k in range(len(parts[0]))]


def vad_probs(sess: ort.InferenceSession, audio: np.ndarray) -> np.ndarray:
    state, probs = np.zeros((2, 1, 128), np.float32), []
    for chunk in corpus_data.windows(audio):
        p, state = sess.run(None, {"input": chunk[None], "state": state, "sr": np.array(16000, np.int64)})
        probs.append(float(p.ravel()[0]))
    return np.array(probs)


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


class TvmSession:
    """A compiled TVM library behind the two calls `score` makes of an ORT session."""

    @dataclass
    class Input:
        name: str
        shape: list[int]

    def __init__(self, library: Path):
        from qpasses.targets.lower.tvm import Runner

        self.runner = Runner(library)

    def get_inputs(self) -> list[Input]:
        return [self.Input(name, list(v.shape)) for name, v in self.runner.feeds.items()]

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.outputs(feeds)


def score(entry: dict, float_path: Path, int8_path: Path, evals) -> tuple[str, float, dict]:
    """(metric text, worst-output SQNR, numbers) of the int8 model (ONNX, or a TVM library) against the float model."""
    ref_sess = float_session(str(float_path))
    got_sess = TvmSession(int8_path) if int8_path.suffix == ".so" else float_session(str(int8_path))
    task, name = entry["task"], entry["input"]
    if task == "vad":
        ref, got = vad_probs(ref_sess, evals), vad_probs(got_sess, evals)
        t = entry["threshold"]
        agree = float(np.mean((ref > t) == (got > t)))
        return f"frame agreement {agree:.3f} ({int((ref > t).sum())}/{len(ref)} speech)", sqnr(ref, got), {"agreement": agree}
    x = evals[0] if task == "classifier" else evals
    fixed = any(isinstance(s.get_inputs()[0].shape[0], int) for s in (ref_sess, got_sess))
    ref, got = run_batches(ref_sess, name, x, fixed), run_batches(got_sess, name, x, fixed)
    worst = min(sqnr(r, g) for r, g in zip(ref, got))
    if task == "classifier":
        agree = float(np.mean(ref[0].argmax(1) == got[0].argmax(1)))
        text = f"top-1 agreement {agree:.3f} of {len(x)}"
        if evals[1] is not None:
            acc = float(np.mean(got[0].argmax(1) == evals[1])), float(np.mean(ref[0].argmax(1) == evals[1]))
            text += f" (accuracy {acc[0]:.3f}, float {acc[1]:.3f})"
        return text, worst, {"agreement": agree}
    if task == "ocr-ctc":
        rt, gt = ctc_text(ref[0], entry), ctc_text(got[0], entry)
        exact = float(np.mean([a == b for a, b in zip(rt, gt)]))
        cer = float(np.mean([edit_distance(a, b) / max(1, len(a)) for a, b in zip(rt, gt)]))
        return f"exact text {exact:.3f}, CER {cer:.3f}", worst, {"exact": exact, "cer": cer}
    decode = yolox_detections if task == "detection-yolox" else picodet_detections
    kept, total = kept_fraction(decode(ref, entry), decode(got, entry))
    text = "no float detections" if kept is None else f"detections kept {kept:.3f} of {total}"
    return text, worst, {"kept": kept, "detections": total}


TASK_GOALS = {"detection-yolox": 0.90, "detection-picodet": 0.90, "ocr-ctc": 0.85, "classifier": 0.98, "vad": 0.98}


def task_value(entry: dict, ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The task metric of one model's outputs against the float model's, as `qpass quantize --metric`
    calls it: detections kept, exact text, top-1 or speech-decision agreement (1.0: nothing to lose)."""
    task = entry["task"]
    if task == "classifier":
        return float(np.mean(ref[0].argmax(1) == got[0].argmax(1)))
    if task == "vad":
        return float(np.mean((ref[0] > entry["threshold"]) == (got[0] > entry["threshold"])))
    if task == "ocr-ctc":
        return float(np.mean([a == b for a, b in zip(ctc_text(ref[0], entry), ctc_text(got[0], entry))]))
    decode = yolox_detections if task == "detection-yolox" else picodet_detections
    kept, _ = kept_fraction(decode(ref, entry), decode(got, entry))
    return 1.0 if kept is None else kept


METRIC_FILE = """# written by tools/real_models.py: {name}'s task metric, for qpass quantize --metric
import json
import sys

sys.path.insert(0, {tools!r})
import real_models  # noqa: E402

ENTRY = json.loads({entry!r})


def metric(reference, candidate):
    return real_models.task_value(ENTRY, reference, candidate)
"""


def auto_options(name: str, entry: dict, model: Path, work: Path) -> list[str]:
    """`qpass quantize --auto` to the corpus goal of the model's task, measured by its task metric on
    validation data (`validation_feeds`) the table does not score: 20 samples held back from
    calibration told 0.98 from 0.95 and 0.85 from 0.75 poorly."""
    path = work / f"{name}.metric.py"
    path.write_text(METRIC_FILE.format(name=name, tools=str(Path(__file__).resolve().parent), entry=json.dumps(entry)))
    validation = work / f"{name}.validation.npz"
    np.savez(validation, **validation_feeds(entry, model))
    return ["--target", "onnxruntime", "--auto", "--metric", f"{path}:metric",
            "--min-metric", str(TASK_GOALS[entry["task"]]), "--eval-data", str(validation)]


def validation_feeds(entry: dict, model: Path) -> dict[str, np.ndarray]:
    """Data from the calibration's sources, never the evaluation's: 96 more text lines, 24 more
    document pages, the calibration phrases spoken anew (VAD windows), or new crops of the
    calibration photos (in their four rotations for the orientation classifier; four times as
    many for a detector: 45 crops held 26 float detections, too few to tell 0.90 from 0.80)."""
    task = entry["task"]
    if task == "ocr-ctc":
        return {entry["input"]: corpus_data.text_images(entry, 96, seed=3)}
    if entry.get("data") == "documents":
        return {entry["input"]: corpus_data.document_pages(entry, 24, seed=3, evaluation=False)}
    if task == "vad":
        return vad_feeds(model, corpus_data.speech(3, corpus_data.CALIBRATION_PHRASES))
    if task.startswith("detection"):
        crops = np.concatenate([corpus_data.image_split(entry, seed=seed, whole=False)[0] for seed in (3, 4, 5, 6)])
        return {entry["input"]: crops}
    crops, _ = corpus_data.image_split(entry, seed=3, whole=False)
    return {entry["input"]: corpus_data.rotations(crops)[0] if entry.get("rotations") else crops}


def latency_ratio(float_path: Path, int8_path: Path, input_name: str, x: np.ndarray, runs: int = 20) -> float:
    """Median ORT int8 / float latency, 1 thread, batch 1, runs interleaved."""
    sessions = [float_session(str(float_path), threads=1), float_session(str(int8_path), threads=1)]
    feed = {input_name: x[:1]}
    times: list[list[float]] = [[], []]
    for s in sessions:
        s.run(None, feed)
    for _ in range(runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return float(np.median(times[1]) / np.median(times[0]))


# --- running qpass ---------------------------------------------------------------------------------

def qpass(*args: str) -> tuple[int, str, float, float]:
    """Run the CLI; (exit code, stderr, wall seconds, peak RSS in MiB) of that one process.

    The peak is the child's VmHWM, read until it exits: its rusage would also count the harness's
    own memory, which the child holds between fork and exec."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "qpasses.cli", *args], stdout=subprocess.DEVNULL, stderr=err)
        peak = 0.0
        while proc.poll() is None:
            peak = _high_water_mib(proc.pid) or peak  # monotonic after exec: the last reading is the peak
            time.sleep(0.05)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return proc.returncode, text, time.perf_counter() - start, peak


def _high_water_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # it has just exited
        return None
    return None


def run_model(name: str, entry: dict, model: Path, work: Path, rows: list[tuple[str, list[str]]]) -> list[Row]:
    if entry["task"] == "refused":
        code, err, secs, peak = qpass("quantize", str(model), "--target", "onnxruntime", "--data", "random:4",
                                      "-o", str(work / f"{name}.int8.onnx"), "--force")
        lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]
        ok = code == 2 and len(lines) == 1 and "already quantized" in lines[0] and not (work / f"{name}.int8.onnx").exists()
        return [Row(name, "refused", 0 if ok else 1, None, lines[0] if lines else err.strip(), None, secs, peak)]
    calib, evals = build_data(name, entry, model, work)
    out = []
    for label, options in rows:
        options = auto_options(name, entry, model, work) if label == AUTO else options
        target = options[options.index("--target") + 1]
        int8 = work / f"{name}.{label.split(' (')[0].replace(' ', '_').replace('-', '')}.onnx"
        code, err, secs, peak = qpass("quantize", str(model), *options, "--data", str(calib), "-o", str(int8),
                                      "--force", *([] if label == AUTO else ["--quiet"]))
        lines = err.strip().splitlines()
        missed = label == AUTO and code == 1 and bool(lines) and "--auto: no setting met the goal" in lines[-1]
        row = Row(name, label, 0 if missed else code, seconds=secs, peak_mib=peak)
        if label == AUTO:  # what the search tried, and what it chose
            trials = [line for line in lines if line.startswith("auto: trial")]
            row.note = f"{len(trials)} trial(s); " + ("goal not met, best written" if missed else
                                                      (trials[-1].split(": ", 1)[1] if trials else ""))
        if row.exit_code != 0:
            row.note = err.strip().splitlines()[-1] if err.strip() else f"exit {code}"
            out.append(row)
            print(f"{name:18s} {label:34s} FAILED exit {code}: {row.note}", file=sys.stderr)
            continue
        check, check_err, _, _ = qpass("check", str(int8), "--target", target)
        row.conforms = check == 0
        row.metric, row.sqnr_db, row.extra = score(entry, model, int8, evals)
        if label == "onnxruntime minmax":
            row.int8_coverage = int8_coverage(onnx.load(int8)).share
        if label == "onnxruntime minmax" and entry["task"] != "vad":
            x = evals[0] if entry["task"] == "classifier" else evals
            row.latency_ratio = latency_ratio(model, int8, entry["input"], x)
        if label == AUTO:
            row.metric += f" ({row.note})"
        out.append(row)
        print(f"{name:18s} {label:34s} {row.metric}; SQNR {row.sqnr_db:.1f} dB; {secs:.1f} s, {peak:.0f} MiB"
              + ("" if row.conforms else f"; CHECK FAILED: {check_err.strip().splitlines()[-1:]}"), file=sys.stderr)
        if label == "onnxruntime minmax":
            out.append(eval_row(name, entry, model, int8, calib, evals, work))
            out += compile_rows(name, entry, model, int8, evals, work)
    out.append(analyze_row(name, entry, model, calib, evals, work))
    return out


def eval_row(name: str, entry: dict, model: Path, int8: Path, calib: Path, evals, work: Path) -> Row:
    """`qpass eval` of the int8 model against the float one, as a user checks a model: on the held-out
    images, or for the VAD on the calibration windows (`eval` feeds whole inputs, state included)."""
    report, data = work / f"{name}.eval.json", calib
    if entry["task"] != "vad":
        data = work / f"{name}.eval.npz"
        np.savez(data, **{entry["input"]: evals[0] if entry["task"] == "classifier" else evals})
    code, err, secs, peak = qpass("eval", str(model), str(int8), "--data", str(data), "--report", str(report),
                                  "--force", "--quiet")
    row = Row(name, "eval", code, seconds=secs, peak_mib=peak)
    if code == 0:
        result = json.loads(report.read_text())
        row.sqnr_db, row.metric = result["worst_sqnr_db"], f"{result['samples']} samples, worst output SQNR"
    else:
        row.note = err.strip().splitlines()[-1] if err.strip() else f"exit {code}"
    print(f"{name:18s} {'eval':34s} exit {code}: {row.metric or row.note}", file=sys.stderr)
    return row


FALLBACK_GOAL_DB = 30.0


def analyze_row(name: str, entry: dict, model: Path, calib: Path, evals, work: Path) -> Row:
    """`qpass analyze --fallback` on the onnxruntime target, the mixed model checked and scored. A goal
    the model cannot reach is an answer (exit 1 with one line, the best model written), not a failure."""
    mixed, report = work / f"{name}.mixed.onnx", work / f"{name}.analysis.json"
    code, err, secs, peak = qpass("analyze", str(model), "--target", "onnxruntime", "--data", str(calib), "--fallback",
                                  "--min-sqnr", str(FALLBACK_GOAL_DB), "-o", str(mixed), "--report", str(report),
                                  "--force", "--quiet")
    lines = err.strip().splitlines()
    missed = code == 1 and bool(lines) and lines[-1].startswith("qpass: error: fallback goal not met")  # after "wrote"
    row = Row(name, f"analyze --fallback --min-sqnr {FALLBACK_GOAL_DB:g}", 0 if missed else code, seconds=secs, peak_mib=peak)
    if row.exit_code != 0:
        row.note = lines[-1] if lines else f"exit {code}"
        print(f"{name:18s} {row.config:34s} FAILED exit {code}: {row.note}", file=sys.stderr)
        return row
    analysis = json.loads(report.read_text())
    layers = sum(len(u["layers"]) for u in analysis["layers"])
    if len(analysis["fallback"]) < layers:  # an all-float model has no Q/DQ to check
        row.conforms = qpass("check", str(mixed), "--target", "onnxruntime")[0] == 0
    metric, row.sqnr_db, row.extra = score(entry, model, mixed, evals)
    share = analysis["int8_share"]
    row.metric = (f"{len(analysis['fallback'])} of {layers} layers float ({len(analysis['layers'])} units, "
                  f"{100 * (share or 0):.0f}% of MACs int8), goal {'met' if analysis['goal_met'] else 'not met'}; {metric}")
    print(f"{name:18s} {row.config:34s} {row.metric}; {secs:.1f} s, {peak:.0f} MiB", file=sys.stderr)
    return row


ENGINES = (("onnxruntime", [], ".ort.onnx"), ("tvm-x86", ["--engine", "tvm", "--target", "tvm-x86"], ".x86.so"),
           ("tvm-arm", ["--engine", "tvm", "--target", "tvm-arm"], ".arm.so"))


def compile_rows(name: str, entry: dict, model: Path, int8: Path, evals, work: Path) -> list[Row]:
    """`qpass compile` of the onnxruntime int8 model for each engine; the x86 TVM library runs here and is
    scored like the ONNX models. A model an engine cannot take must be refused with one line and exit 2,
    never a crash."""
    rows = []
    for engine, options, suffix in ENGINES:
        artifact = work / f"{int8.stem}{suffix}"
        code, err, secs, peak = qpass("compile", str(int8), *(options or ["--engine", "onnxruntime"]), "-o", str(artifact),
                                      "--force", "--quiet")
        lines = [line for line in err.strip().splitlines() if line.startswith("qpass:")]
        refused = code == 2 and len(lines) == 1
        row = Row(name, f"compile {engine}", 0 if code == 0 or refused else code, seconds=secs, peak_mib=peak,
                  metric="compiled" if code == 0 else (lines[-1] if lines else f"exit {code}"))
        if code == 0 and engine == "tvm-x86":
            metric, row.sqnr_db, row.extra = score(entry, model, artifact, evals)
            row.metric = f"compiled; {metric}"
        rows.append(row)
        print(f"{name:18s} {'compile ' + engine:34s} exit {code}: {row.metric}; {secs:.1f} s", file=sys.stderr)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| model | quantize | exit | conforms | task metric (int8 vs float) | worst SQNR dB | "
             "ORT int8/float | int8 coverage | wall s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        conf = "" if r.conforms is None else ("yes" if r.conforms else "**no**")
        lines.append(f"| {r.model} | {r.config} | {r.exit_code} | {conf} | {r.metric or r.note} | "
                     f"{'' if r.sqnr_db is None else f'{r.sqnr_db:.1f}'} | "
                     f"{'' if r.latency_ratio is None else f'{r.latency_ratio:.2f}'} | "
                     f"{'' if r.int8_coverage is None else f'{100 * r.int8_coverage:.0f}%'} | {r.seconds:.1f} | {r.peak_mib:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="the models marked ci, fewer configurations")
    parser.add_argument("--only", nargs="*", help="registry names")
    parser.add_argument("--adaround", action="store_true", help="also run --adaround (slow)")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--work", type=Path, help="where data and int8 models go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    parser.add_argument("--json", type=Path, help="write every row as JSON")
    args = parser.parse_args(argv)
    entries = registry(args.only, args.ci)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, entry in entries.items():
            rows += run_model(name, entry, fetch(name, entry, args.cache), work, configs(args.ci, args.adaround))
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str) + "\n")
    failed = [r for r in rows if not r.ok]
    for r in failed:
        print(f"real_models: {r.model} {r.config}: {'exit ' + str(r.exit_code) if r.exit_code else 'does not conform'}"
              f" {r.note}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
