"""`--html report.html`: one self-contained page a person reads after a run (no scripts, no fetches).

Sections: the summary (model, target, calibration, fidelity and gates), SQNR per layer as bars
(each layer's output in the quantized model against the float model, on the held-back or
--eval-data samples), histograms of the activations read by the worst layers with the quantizer's
clipping range drawn on them, where Q/DQ went (quantized, fused, float and why), and the latency
table of a `qpass bench --report` record when one is given (`--latency bench.json`). Charts are inline SVG, so the page renders anywhere, offline.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import onnx

from qpasses.calibration.data import DataSource
from qpasses.calibration.runner import run_outputs, with_outputs

from .analyze import tensor_sqnr
from .plan import QuantPlan

WORST_SHOWN = 6  # layers whose input histograms are drawn
BINS = 64


@dataclass
class Histogram:
    tensor: str
    layer: str
    counts: list[int]
    edges: tuple[float, float]  # the histogram's span
    clip: tuple[float, float]  # what the quantizer represents: (qmin - z) * s, (qmax - z) * s


def layer_sqnr(plan: QuantPlan, float_model: onnx.ModelProto, quantized: onnx.ModelProto, data: DataSource,
               batch_size: int) -> dict[str, float]:
    """Layer -> SQNR in dB of its output tensor in the quantized model, in graph order."""
    outputs = {layer: plan.layer_output(layer) for layer in plan.layers()}
    by_tensor = tensor_sqnr(float_model, quantized, sorted(set(outputs.values())), data, batch_size)
    return {layer: by_tensor[tensor] for layer, tensor in outputs.items()}


def input_histograms(plan: QuantPlan, float_model: onnx.ModelProto, layers: list[str], data: DataSource,
                     batch_size: int) -> list[Histogram]:
    """Histograms of the quantized activations the given layers read, on `data`, with their clipping ranges."""
    members = {g[0]: set(g) for g in plan.groups}
    wanted: dict[str, str] = {}
    for layer in layers:
        nodes = members.get(layer, {layer})
        for name, act in plan.activations.items():
            if name not in wanted and any(node in nodes for node, _ in act.consumers):
                wanted[name] = layer
    if not wanted:
        return []
    model = with_outputs(float_model, wanted)
    values = dict(zip((o.name for o in model.graph.output), run_outputs(model, data, batch_size)))
    histograms = []
    for name in wanted:
        if name not in values:
            continue
        x = values[name].astype(np.float64).ravel()
        qp = plan.qparams[plan.quantizer_of(name)]
        scale, zero_point = float(np.ravel(qp.scale)[0]), int(np.ravel(qp.zero_point)[0])
        clip = ((qp.qmin - zero_point) * scale, (qp.qmax - zero_point) * scale)
        lo, hi = min(float(x.min()), clip[0]), max(float(x.max()), clip[1])
        counts, _ = np.histogram(x, bins=BINS, range=(lo, hi if hi > lo else lo + 1.0))
        histograms.append(Histogram(name, wanted[name], counts.tolist(), (lo, hi), clip))
    return histograms


def render(record: dict, sqnr_by_layer: dict[str, float], histograms: list[Histogram],
           bench: dict | None = None) -> str:
    """The page for one quantize run: `record` is its JSON report (qpasses/report.py), `bench` a
    `qpass bench --report` record of its artifact."""
    target = record["target"]["name"]
    title = f"qpass: {record['input']['path']} for {target}"
    sections = [_summary(record), _engine(record.get("engine")), _sqnr_bars(sqnr_by_layer), _histograms(histograms),
                _placement(record)]
    if bench:
        sections.append(_latency(bench))
    body = "\n".join(sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ddd; margin-top: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }} .fail {{ color: #b00020; font-weight: 600; }} .ok {{ color: #17663a; }}
.hist {{ display: inline-block; margin: 0 12px 12px 0; }} code {{ font-size: 0.92em; }}
</style></head>
<body><h1>{_e(title)}</h1>
{body}
</body></html>
"""


def _engine(engine: dict | None) -> str:
    """What the engine's own optimised graph runs of the int8 plan (the report's `engine`)."""
    if not engine or engine["int8_coverage"] is None:
        return ""
    head = (f"<h2>What {_e(engine['name'])} runs</h2>\n<p>{100 * engine['int8_coverage']:.1f}% of the planned int8 "
            f"conv/matmul MACs run in integer kernels ({engine['integer']} of {engine['planned']} nodes); "
            f"{len(engine['overhead_qdq'])} Q/DQ pair(s) feed no integer kernel"
            + (f"; {100 * engine['model_int8_share']:.1f}% of all the model's conv/matmul MACs"
               if engine.get("model_int8_share") is not None and engine["model_int8_share"] < engine["int8_coverage"] else "")
            + ".</p>")
    if not engine["float_nodes"]:
        return head
    rows = "\n".join(f"<tr><td><code>{_e(n['name'])}</code></td><td>{_e(n['op'])} as {_e(n['kernel'])}</td>"
                     f"<td>{n['macs'] / 1e6:.1f} M</td><td>{_e(n['reason'])}</td></tr>" for n in engine["float_nodes"])
    return f"{head}\n<table><tr><th>planned int8, runs float</th><th>op</th><th>MACs</th><th>why</th></tr>\n{rows}</table>"


def _summary(record: dict) -> str:
    cal, fidelity = record["calibration"], record["fidelity"]
    rows = [("input", f"{record['input']['path']} (sha256 {record['input']['sha256'][:12]}…)"),
            ("output", f"{record['output']['path']} (sha256 {record['output']['sha256'][:12]}…)"),
            ("target", record["target"]["name"]),
            ("calibration", f"{cal['activations']} activations, {cal['weights']} weights; {cal['samples']} samples, "
                            f"{cal['held_back']} held back"),
            ("held-back SQNR", ", ".join(f"{k}: {_db(v)}" for k, v in fidelity["sqnr_db"].items()) or "not measured"),
            ("nodes", f"{len(record['nodes']['quantized'])} quantized, {len(record['nodes']['fused'])} fused, "
                      f"{len(record['nodes']['float'])} float"),
            ("versions", ", ".join(f"{k} {v}" for k, v in record["versions"].items()))]
    decisions = record["techniques"]["decisions"]
    if decisions:
        rows.append(("techniques", "; ".join(f"{d['technique']}: {'kept' if d['kept'] else 'dropped'} "
                                             f"({_db(d['before_db'])} → {_db(d['after_db'])})" for d in decisions)))
    evaluation = fidelity.get("evaluation")
    if evaluation:
        measured = f"{evaluation['samples']} samples ({evaluation['data']}): worst SQNR {_db(evaluation['worst_sqnr_db'])}"
        if evaluation.get("drop") is not None:
            measured += (f"; top-1 {evaluation['candidate_top1']:.2f}% against the float model's "
                         f"{evaluation['reference_top1']:.2f}% ({evaluation['metric']})")
        rows.append(("evaluation", measured))
    gates = record.get("gates")
    if gates:
        goals = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in gates.items() if k != "failed" and v is not None)
        verdict = ('<span class="fail">failed: ' + _e("; ".join(gates["failed"])) + "</span>") if gates["failed"] \
            else '<span class="ok">passed</span>'
        rows.append(("gates", f"{_e(goals)}: {verdict}"))
    conformance = record["conformance"]
    if conformance.get("violations"):
        rows.append(("conformance", f'<span class="fail">{len(conformance["violations"])} rule violation(s)</span>'))
    cells = "\n".join(f"<tr><th>{_e(k)}</th><td>{v if k in ('gates', 'conformance') else _e(v)}</td></tr>"
                      for k, v in rows)
    return f"<h2>Summary</h2>\n<table>\n{cells}\n</table>"


def _sqnr_bars(sqnr_by_layer: dict[str, float]) -> str:
    if not sqnr_by_layer:
        return "<h2>SQNR per layer</h2>\n<p>Not measured: no held-back or --eval-data samples.</p>"
    finite = [v for v in sqnr_by_layer.values() if np.isfinite(v)]
    top = max(finite + [1.0])
    row, label_w, bar_w = 18, 300, 560
    bars = []
    for i, (layer, db) in enumerate(sqnr_by_layer.items()):
        width = bar_w * (min(db, top) / top if np.isfinite(db) else 1.0) if db > 0 else 0
        color = "#b00020" if db < 20 else "#d98c00" if db < 30 else "#2a7ab0"
        y = i * row
        bars.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="11">{_e(_short(layer))}</text>'
                    f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row - 5}" fill="{color}">'
                    f"<title>{_e(layer)}: {_db(db)}</title></rect>"
                    f'<text x="{label_w + width + 4:.1f}" y="{y + 13}" font-size="11">{_db(db)}</text>')
    height = row * len(sqnr_by_layer) + 4
    return (f"<h2>SQNR per layer</h2>\n<p>Each layer's output in the quantized model against the float model "
            f"(higher is better; red below 20 dB, amber below 30 dB).</p>\n"
            f'<svg width="{label_w + bar_w + 80}" height="{height}" role="img">{"".join(bars)}</svg>')


def _histograms(histograms: list[Histogram]) -> str:
    if not histograms:
        return ""
    charts = []
    w, h = 300, 140
    for hist in histograms:
        lo, hi = hist.edges
        span = hi - lo or 1.0
        peak = max(hist.counts) or 1
        step = w / len(hist.counts)
        bars = "".join(f'<rect x="{i * step:.2f}" y="{h - h * np.log1p(c) / np.log1p(peak):.2f}" '
                       f'width="{step:.2f}" height="{h * np.log1p(c) / np.log1p(peak):.2f}" fill="#7a9cc6"/>'
                       for i, c in enumerate(hist.counts) if c)
        x0, x1 = (w * (v - lo) / span for v in hist.clip)
        lines = "".join(f'<line x1="{x:.2f}" x2="{x:.2f}" y1="0" y2="{h}" stroke="#b00020" stroke-width="2"/>'
                        for x in (x0, x1))
        charts.append(f'<div class="hist"><div><code>{_e(_short(hist.tensor))}</code> → {_e(_short(hist.layer))}</div>'
                      f'<svg width="{w}" height="{h + 16}" role="img"><title>{_e(hist.tensor)}</title>'
                      f'{bars}{lines}<text x="0" y="{h + 13}" font-size="10">{lo:.3g}</text>'
                      f'<text x="{w}" y="{h + 13}" font-size="10" text-anchor="end">{hi:.3g}</text></svg>'
                      f"<div>clipping range [{hist.clip[0]:.4g}, {hist.clip[1]:.4g}]</div></div>")
    return ("<h2>Activations of the worst layers</h2>\n<p>Histograms (log counts) of the float values each layer "
            "reads; red lines: the range its quantizer represents. Values outside it are clipped.</p>\n"
            + "\n".join(charts))


def _placement(record: dict) -> str:
    nodes = record["nodes"]
    fused = {}
    for node, head in nodes["fused"].items():
        fused.setdefault(head, []).append(node)
    float_rows = "".join(f"<tr><td><code>{_e(n)}</code></td><td>{_e(why)}</td></tr>" for n, why in nodes["float"].items())
    fused_rows = "".join(f"<tr><td><code>{_e(head)}</code></td><td>{_e(', '.join(members))}</td></tr>"
                         for head, members in fused.items())
    activations = record["tensors"]["activations"]
    return (f"<h2>Q/DQ placement</h2>\n<p>{len(nodes['quantized'])} nodes quantized; {len(activations)} activation "
            f"tensors and {len(record['tensors']['weights'])} weights carry Q/DQ.</p>\n"
            + (f"<h3>Fused (no Q/DQ inside)</h3>\n<table><tr><th>head</th><th>fused nodes</th></tr>{fused_rows}</table>\n"
               if fused_rows else "")
            + (f"<h3>Kept in float</h3>\n<table><tr><th>node</th><th>why</th></tr>{float_rows}</table>"
               if float_rows else "<p>No node kept in float.</p>"))


def _latency(bench: dict) -> str:
    """The measurements of a `qpass bench --report` record."""
    columns = ("median_ms", "p90_ms", "min_ms", "std_ms", "runs")
    rows = "".join(f"<tr><td>{_e(label)}</td><td><code>{_e(entry['path'])}</code></td>"
                   + "".join(f"<td>{entry['latency'][c]:.3f}</td>" if c != "runs" else f"<td>{entry['latency'][c]}</td>"
                             for c in columns) + "</tr>"
                   for label, entry in bench["models"].items())
    header = "".join(f"<th>{c.replace('_ms', ' ms')}</th>" for c in columns)
    speedup = f"<p>speed-up (compare / model): {bench['speedup']:.2f}x</p>" if bench.get("speedup") else ""
    return (f"<h2>Latency</h2>\n<p>{_e(bench['engine'])} on {_e(bench['device'])}</p>\n"
            f"<table><tr><th>model</th><th>path</th>{header}</tr>{rows}</table>{speedup}")


def _db(value) -> str:
    if isinstance(value, str):
        return value + " dB"
    return "n/a" if value is None else f"{value:.2f} dB"


def _short(name: str, most: int = 44) -> str:
    return name if len(name) <= most else "…" + name[-(most - 1):]


def _e(value) -> str:
    return html.escape(str(value))
