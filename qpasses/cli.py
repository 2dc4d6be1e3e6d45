"""The `qpass` command line.

Every user-facing failure is one line on stderr and a documented exit code (see errors.py);
`--debug` shows tracebacks and checks the graph after every pass.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qpasses import __version__
from qpasses.calibration.data import RANDOM_WARNING, DataSource, is_random, open_source, random_source
from qpasses.calibration.runner import check_loads, input_specs
from qpasses.calibration.observers import OBSERVERS
from qpasses.errors import EngineError, GateError, InputError, QpassError
from qpasses.targets.check import check_model, format_check
from qpasses.targets.lower import ENGINES, INT_KERNELS, SUFFIX, engine, expect_kind
from qpasses.targets.schema import builtin_names, load_target

from . import graph as graph_io
from .analyze import Goal, analyze as run_analyze, format_analysis
from .auto import ADAROUND_ITERATIONS, DEFAULT_DROP, DEFAULT_SQNR, describe, describe_goal, search, techniques as auto_techniques
from .bench import BenchResult, IncompleteRun, cpu_description, cpu_flags, format_bench, measure
from .encodings import read_encodings, to_encodings
from .fidelity import compare, format_fidelity
from .metric import TaskMetric, load_metric
from .html_report import WORST_SHOWN, input_histograms, layer_sqnr, render
from .outputs import Files
from .pass_infra import PassContext
from .passes.calibrate import ACTIVATION_METHODS
from .pipeline import ALL_PASSES, Techniques, prepare, quantize as run_quantize, shapes_from_data
from .report import dumps, quantize_report, sha256


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qpass")
def cli() -> None:
    """qpass: quantize float ONNX models for a deployment target."""


class FiniteFloat(click.FloatRange):
    """A number option that must be finite: click's own float types let nan and inf through, and
    every comparison with nan is false, so `--min-sqnr nan` would be a gate that never fails."""

    name = "number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def config_option(command):
    """`--config FILE` (option values from the file's table named after the command; the command line
    wins) and `--verbose` (what each step did, on stderr), for every command."""
    command = click.option("--verbose", "-v", is_flag=True, expose_value=False, callback=_verbose,
                           help="Log each step (passes, schedules, RPC) with its timing on stderr.")(command)
    return click.option("--config", type=click.Path(path_type=Path), is_eager=True, expose_value=False,
                        callback=_read_config, metavar="FILE.toml",
                        help="Take option values from this TOML file's [<command>] table (the command line "
                             "overrides them).")(command)


def _verbose(_ctx: click.Context, _param: click.Parameter, on: bool) -> None:
    if on:
        logging.basicConfig(format="qpass: %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("qpasses").setLevel(logging.DEBUG)


def _read_config(ctx: click.Context, _param: click.Parameter, path: Path | None) -> None:
    """Set the command's defaults from the table; keys are option names (`min-sqnr` or `min_sqnr`)."""
    if path is None:
        return
    try:
        tables = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"--config {path}: {exc}") from None
    strays = sorted(set(tables) - set(cli.commands))
    if strays:  # a misspelled table would otherwise be ignored and the defaults run
        raise InputError(f"--config {path}: [{strays[0]}] is not a qpass command; the tables are named after "
                         f"commands: {', '.join(sorted(cli.commands))}")
    section = tables.get(ctx.info_name, {})
    if not isinstance(section, dict):
        raise InputError(f"--config {path}: [{ctx.info_name}] must be a table of option values")
    names = {}
    for param in ctx.command.params:
        if param.name not in ("config", "help"):
            names[param.name] = param.name
            names.update({opt.lstrip("-"): param.name for opt in param.opts})
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise InputError(f"--config {path}: `qpass {ctx.info_name}` has no option {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **{names[key]: value for key, value in section.items()}}
    ctx.meta["qpass.config"] = path


def _files(force: bool, inputs: dict[str, Path | str | None], outputs: dict[str, Path | None]) -> Files:
    """This command's paths, checked before any work (the --config file is an input too)."""
    config = click.get_current_context().meta.get("qpass.config")
    return Files({**inputs, "the --config file": config}, outputs, force)


def _warn_random(data: str | None) -> None:
    """Said once the run is done (quiet or not), so that an error before it is still the only line."""
    if is_random(data):
        click.echo(RANDOM_WARNING, err=True)


def _calibration_inputs(model: Path, opts: dict) -> dict[str, Path | str | None]:
    return {"the input model": model, "the --data file": opts["data"], "the --preprocess file": opts["preprocess"],
            "the --target file": opts["target_name"]}


def calibration_options(command):
    """The options every command that calibrates takes (quantize, analyze)."""
    options = [
        click.argument("model", type=click.Path(path_type=Path)),
        click.option("--target", "-t", "target_name", default="onnxruntime", show_default=True,
                     help="Shipped target name (see `qpass targets`) or path of a target .toml file."),
        click.option("--calib", default="minmax", show_default=True, type=click.Choice(sorted(ACTIVATION_METHODS)),
                     help="Range-setting method for activations (MQBench app. C.1); best: per tensor, the one of "
                          "minmax, quantile, mse and kl that gives its consumers' outputs the least error."),
        click.option("--weight-calib", default="minmax", show_default=True, type=click.Choice(sorted(OBSERVERS)),
                     help="Range-setting method for weights."),
        click.option("--quantile", type=FiniteFloat(), help="Quantile for --calib/--weight-calib quantile [default: 0.9999]."),
        click.option("--meanstd-k", type=FiniteFloat(), help="k of mean +/- k*std for meanstd [default: 3]."),
        click.option("--data", "-d",
                     help="Calibration inputs: a .npy/.npz file, a directory of them, a directory of images, "
                          "or 'random[:N]' (a smoke test, not calibration)."),
        click.option("--preprocess", type=click.Path(path_type=Path), help="Preprocessing spec (TOML) for an image directory."),
        click.option("--input-shape", multiple=True, metavar="NAME=1x3x224x224", help="Sizes for dynamic input dimensions."),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1)),
        click.option("--max-samples", type=click.IntRange(min=1), help="Use at most this many calibration samples."),
        click.option("--holdout", type=click.IntRange(min=0),
                     help="Samples held back from --data to measure output SQNR [default: 1/8, at most 64]."),
        click.option("--float-layer", "float_layers", multiple=True, metavar="LAYER",
                     help="Keep this layer in float (names as `qpass analyze` lists them); repeatable."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for every random choice."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary."),
        click.option("--debug", is_flag=True, help="Check the graph after every pass; show tracebacks."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def metric_options(command):
    """`--metric FILE.py:FUNCTION` and `--min-metric X` (qpasses/metric.py), for quantize, analyze and eval."""
    command = click.option("--min-metric", type=FiniteFloat(),
                           help="Goal / gate: the --metric value must be at least this.")(command)
    return click.option("--metric", "metric_spec", metavar="FILE.py:FUNCTION",
                        help="Your task metric: FUNCTION(reference_outputs, candidate_outputs) -> number, higher is "
                             "better (e.g. the fraction of detections kept).")(command)


def _metric(spec: str | None, minimum: float | None) -> TaskMetric | None:
    if minimum is not None and spec is None:
        raise InputError("--min-metric needs --metric FILE.py:FUNCTION")
    return load_metric(spec) if spec is not None else None


def _metric_file(spec: str | None) -> dict[str, Path | None]:
    """The --metric file, an input no output may replace."""
    return {"the --metric file": Path(spec.rpartition(":")[0]) if spec and ":" in spec else None}


def _setup(opts: dict) -> tuple:
    """Check the shared options; returns the target and the pass context."""
    target = load_target(opts["target_name"])
    quantile, meanstd_k, data = opts["quantile"], opts["meanstd_k"], opts["data"]
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise InputError(f"--quantile must be in (0, 1], got {quantile}")
    if meanstd_k is not None and meanstd_k <= 0:
        raise InputError(f"--meanstd-k must be positive, got {meanstd_k}")
    options = {k: v for k, v in {"q": quantile, "k": meanstd_k}.items() if v is not None}
    ctx = PassContext(calib_method=opts["calib"], weight_calib=opts["weight_calib"], calib_options=options,
                      batch_size=opts["batch_size"], max_samples=opts["max_samples"], seed=opts["seed"],
                      float_layers=tuple(opts["float_layers"]), quiet=opts["quiet"], debug=opts["debug"])
    if is_random(data):
        random_source(data, [], opts["seed"])  # checks the spec before any work
    return target, ctx


@cli.command()
@config_option
@calibration_options
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output path [default: MODEL.<target>.int8.onnx].")
@click.option("--cle", is_flag=True, help="Cross-layer equalization (kept only if it does not lower the output SQNR).")
@click.option("--cle-replace-relu6", is_flag=True, help="Let --cle turn ReLU6 into ReLU to equalize across it.")
@click.option("--smoothquant", is_flag=True,
              help="SmoothQuant: move LayerNorm outlier channels into the matmul weights (kept only if it helps).")
@click.option("--bn-recal", is_flag=True, help="BatchNorm re-calibration of folded layers (kept only if it helps).")
@click.option("--bias-correction", type=click.Choice(["empirical", "analytic"]), is_flag=False, flag_value="empirical",
              help="Bias correction: empirical on calibration data, or analytic from BN statistics where on record "
                   "(kept only if it helps) [flag alone: empirical].")
@click.option("--adaround", is_flag=True, help="AdaRound weight rounding, needs torch (kept only if it helps).")
@click.option("--brecq", is_flag=True,
              help="Block reconstruction (BRECQ with QDrop): weight rounding and activation steps learned per block "
                   "with torch, instead of AdaRound's per layer (kept only if it helps).")
@click.option("--adaround-iters", default=Techniques.adaround_iterations, show_default=True, type=click.IntRange(min=1),
              help=f"AdaRound's optimisation steps per layer, BRECQ's per block (--auto: {ADAROUND_ITERATIONS} unless given).")
@click.option("--report", type=click.Path(path_type=Path),
              help="Write the JSON record of the run here (schema: qpasses/report.py).")
@click.option("--eval-data", help="Samples to gate on (.npy/.npz, may hold `labels`) [default: the held-back part of --data].")
@click.option("--min-sqnr", type=FiniteFloat(), help="Gate: exit 1 if the worst output's SQNR is below this many dB.")
@click.option("--max-drop", type=FiniteFloat(min=0),
              help="Gate: exit 1 if top-1 falls more than this many points below the float model's.")
@click.option("--min-int8-coverage", type=FiniteFloat(0, 100), metavar="PERCENT",
              help="Gate: exit 1 if less than this share of the planned int8 conv/matmul MACs runs in the engine's "
                   "integer kernels (targets that name their engine: onnxruntime).")
@click.option("--html", type=click.Path(path_type=Path),
              help="Write a self-contained HTML page: summary, SQNR per layer, histograms of the worst layers' inputs.")
@click.option("--latency", type=click.Path(path_type=Path), help="With --html: a `qpass bench --report` file to show.")
@click.option("--export-encodings", type=click.Path(path_type=Path),
              help="Write the quantizers as an AIMET/QNN encodings JSON (for SNPE/QNN with the float model).")
@click.option("--encodings", "encodings_path", type=click.Path(path_type=Path),
              help="Take every quantizer from this AIMET encodings JSON instead of calibrating (--data optional).")
@metric_options
@click.option("--auto", is_flag=True,
              help="Search calibration, techniques and float layers until --min-sqnr/--max-drop/--min-metric hold "
                   "(without them: "
                   f"--max-drop {DEFAULT_DROP:g} on a classifier, else --min-sqnr {DEFAULT_SQNR:g}); exit 1 with the "
                   "best found when nothing meets them.")
@click.option("--auto-minutes", type=FiniteFloat(min=0, min_open=True), default=10.0, show_default=True,
              help="--auto: the search's time budget (technique subsets that would not fit are left out).")
@click.option("--min-int8-macs", type=FiniteFloat(min=0, max=100), default=80.0, show_default=True,
              help="--auto: a result meets the goal only with at least this percent of the conv/matmul MACs in int8.")
@click.option("--force", is_flag=True, help="Replace outputs that already exist (without it qpass refuses).")
def quantize(model: Path, output: Path | None, cle: bool, cle_replace_relu6: bool, smoothquant: bool, bn_recal: bool,
             bias_correction: str | None, adaround: bool, brecq: bool, adaround_iters: int, report: Path | None,
             eval_data: str | None, min_sqnr: float | None, max_drop: float | None,
             min_int8_coverage: float | None, html: Path | None,
             latency: Path | None, export_encodings: Path | None, encodings_path: Path | None,
             metric_spec: str | None, min_metric: float | None, auto: bool, auto_minutes: float, min_int8_macs: float,
             force: bool, **opts) -> None:
    """Quantize MODEL for a target and write a Q/DQ ONNX model.

    Exit 1 when a gate fails (--min-sqnr, --max-drop, or the target's rules); the model and the
    report are written first, so the pipeline can keep them. Bad input (--eval-data included) is
    refused before anything is written.

    \b
    Example:
      qpass quantize model.onnx --target tensorrt --calib kl --data calib.npz -o model.int8.onnx
      qpass quantize model.onnx --target snpe --data calib.npz --eval-data val.npz --max-drop 1 --min-sqnr 25
    """
    target, ctx = _setup(opts)
    output = output or model.with_name(f"{model.stem}.{target.name}.int8.onnx")
    _files(force, {**_calibration_inputs(model, opts), "the --eval-data file": eval_data, "the --latency file": latency,
                   "the --encodings file": encodings_path, **_metric_file(metric_spec)},
           {"-o": output, "--report": report, "--html": html, "--export-encodings": export_encodings})
    techniques = Techniques(cle=cle, cle_replace_relu6=cle_replace_relu6, smoothquant=smoothquant, bn_recal=bn_recal,
                            bias_correction=bias_correction,
                            adaround=adaround, brecq=brecq, adaround_iterations=adaround_iters)
    metric = _metric(metric_spec, min_metric)
    if min_int8_coverage is not None and not target.engine:
        raise InputError(f"--min-int8-coverage reads the engine's optimised graph: target {target.name} names no engine "
                         "(use --target onnxruntime, or set engine = \"onnxruntime\" in the target file)")
    if latency is not None and html is None:
        raise InputError("--latency goes with --html")
    bench_record = _read_json(latency, "--latency") if latency is not None else None
    if bench_record is not None and (not isinstance(bench_record, dict) or bench_record.get("schema") != "qpass.bench"
                                     or not isinstance(bench_record.get("models"), dict)):
        raise InputError(f"--latency {latency} is not a `qpass bench --report` record")
    if encodings_path is not None:
        if any((cle, smoothquant, bn_recal, bias_correction, adaround, brecq)):
            raise InputError("--encodings fixes every quantizer: it does not combine with --cle, --smoothquant, "
                             "--bn-recal, --bias-correction, --adaround or --brecq")
        ctx.encodings = read_encodings(encodings_path)
    shapes = graph_io.parse_input_shapes(opts["input_shape"])
    found = None
    if auto:
        if any((cle, smoothquant, bn_recal, bias_correction, adaround, brecq, encodings_path, ctx.float_layers)):
            raise InputError("--auto chooses the techniques and float layers itself: it does not combine with --cle, "
                             "--smoothquant, --bn-recal, --bias-correction, --adaround, --brecq, --encodings or "
                             "--float-layer")
        reference, held = prepare(model, opts["data"], ctx, shapes, opts["holdout"], opts["preprocess"])
        samples = held if eval_data is None else open_source(eval_data, input_specs(reference), opts["preprocess"], opts["seed"])
        if not len(samples):
            raise InputError("--auto needs samples to measure on: give --eval-data, or more --data to hold back from")
        given = (min_sqnr, max_drop, min_metric) != (None, None, None)
        goal = Goal(min_sqnr, max_drop, min_int8_macs / 100, min_metric) if given else None
        if click.get_current_context().get_parameter_source("adaround_iters") == click.core.ParameterSource.DEFAULT:
            techniques = replace(techniques, adaround_iterations=ADAROUND_ITERATIONS)
        say = (lambda line: None) if ctx.quiet else (lambda line: click.echo(line, err=True))  # noqa: E731
        found = search(reference, target, ctx, samples, goal, techniques, 60 * auto_minutes, say, min_int8_macs / 100,
                       metric)
        result = found.result
        chosen = found.trials[found.chosen]
        ctx = replace(ctx, calib_method=chosen.calibration)
        techniques = auto_techniques(techniques, chosen.techniques)
    else:
        result = run_quantize(model, target, opts["data"], ctx, shapes, opts["holdout"], opts["preprocess"], techniques)
        reference = result.reference
        samples = result.held if eval_data is None else \
            open_source(eval_data, input_specs(reference), opts["preprocess"], opts["seed"])
    _warn_random(opts["data"])
    conformance = check_model(result.model, target)
    evaluation, failures = None, []
    if len(samples):  # top-1 and accuracy (with labels) beside the SQNR, whenever there are samples
        evaluation = compare(reference, result.model, samples, ctx.batch_size, metric)
    if min_sqnr is not None or max_drop is not None or min_metric is not None:
        if evaluation is None:
            raise InputError("the gates need samples: give --eval-data, or more --data to hold back from")
        if max_drop is not None and evaluation.metric is None:
            raise InputError("--max-drop needs a classifier (first output [N, classes]); use --min-sqnr")
        failures = evaluation.failures(min_sqnr, max_drop, min_metric)
    coverage = engine(target.engine).int8_coverage(result.model) if target.engine else None
    if min_int8_coverage is not None and coverage is not None and coverage.share is not None \
            and 100 * coverage.share < min_int8_coverage:
        failures.append(f"int8 coverage {100 * coverage.share:.1f}% < --min-int8-coverage {min_int8_coverage:g}%")
    files = graph_io.model_files(result.model, output)
    record = quantize_report(result, ctx, techniques, model, output, files[output], conformance)
    record["calibration"]["data"] = opts["data"]
    if evaluation is not None:
        record["fidelity"]["evaluation"] = {"data": eval_data or "held back from --data", **evaluation.to_json()}
    if coverage is not None:
        record["engine"] = {"name": target.engine, **coverage.to_json()}
    if min_sqnr is not None or max_drop is not None or min_metric is not None or min_int8_coverage is not None:
        record["gates"] = {"min_sqnr": min_sqnr, "max_drop": max_drop, "min_metric": min_metric,
                           "min_int8_coverage": min_int8_coverage,
                           "failed": failures}
    if bench_record is not None:
        record["latency"] = bench_record
    if found is not None:
        record["auto"] = found.to_json()
    if report is not None:
        files[report] = dumps(record)
    if export_encodings is not None:
        files[export_encodings] = dumps(to_encodings(result.state.plan, target))
    if html is not None:
        files[html] = _html(json.loads(dumps(record)), result, samples, ctx.batch_size)
    graph_io.write_all(files)  # together, once nothing can fail for bad input (the gates fail after the writes)
    if not ctx.quiet:
        chosen = Counter(result.state.plan.methods.values())
        picked = f" ({', '.join(f'{m} {n}' for m, n in sorted(chosen.items()))})" if chosen else ""
        how = f"encodings from {encodings_path}" if encodings_path is not None else \
            f"{ctx.calib_method} activations{picked}, {ctx.weight_calib} weights"
        _print_summary(result, output, how)
        if coverage is not None:
            _print_coverage(target.engine, coverage)
        if evaluation is not None:
            click.echo(f"evaluation: {format_fidelity(evaluation)}", err=True)
    if not conformance.ok:
        for violation in conformance.violations:
            click.echo(f"check: {violation}", err=True)
        raise GateError(f"the output breaks {len(conformance.violations)} rule(s) of {target.name} (`qpass check` lists them)")
    if found is not None and not found.met:
        raise GateError(f"--auto: no setting met the goal ({describe_goal(found.goal)}"
                        f"{', by default' if found.default_goal else ''}) in {len(found.trials)} trial(s); wrote the best, "
                        f"trial {found.chosen + 1} ({describe(found.chosen + 1, found.trials[found.chosen]).split(': ', 1)[1]})")
    if failures:
        raise GateError("gate failed: " + "; ".join(failures))


def _html(record: dict, result, samples: DataSource, batch_size: int) -> bytes:
    """The page for this run: its report record plus per-layer SQNR and the worst layers' histograms."""
    by_layer, histograms = {}, []
    if len(samples):
        plan = result.state.plan
        by_layer = layer_sqnr(plan, result.float_model, result.model, samples, batch_size)
        worst = sorted(by_layer, key=by_layer.get)[:WORST_SHOWN]
        histograms = input_histograms(plan, result.float_model, worst, samples, batch_size)
    return render(record, by_layer, histograms, record.get("latency")).encode()


def _read_json(path: Path, option: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{option} {path}: {exc}") from None


@cli.command("eval")
@config_option
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", "-d", required=True, help="Samples (.npy/.npz file or directory, or images; may hold `labels`).")
@click.option("--preprocess", type=click.Path(path_type=Path), help="Preprocessing spec (TOML) for an image directory.")
@click.option("--input-shape", multiple=True, metavar="NAME=1x3x224x224", help="Sizes for dynamic input dimensions.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--max-samples", type=click.IntRange(min=1), help="Compare on at most this many samples.")
@click.option("--min-sqnr", type=FiniteFloat(), help="Gate: exit 1 if the worst output's SQNR is below this many dB.")
@click.option("--max-drop", type=FiniteFloat(min=0), help="Gate: exit 1 if top-1 falls more than this many points.")
@metric_options
@click.option("--report", type=click.Path(path_type=Path), help="Write the comparison as JSON here.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random[:N] data.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--force", is_flag=True, help="Replace outputs that already exist (without it qpass refuses).")
def eval_command(reference: Path, candidate: Path, data: str, preprocess: Path | None, input_shape: tuple[str, ...],
                 batch_size: int, max_samples: int | None, min_sqnr: float | None, max_drop: float | None,
                 metric_spec: str | None, min_metric: float | None, report: Path | None, seed: int, quiet: bool,
                 force: bool) -> None:
    """Compare CANDIDATE's outputs with REFERENCE's on the same samples: SQNR per output, top-1.

    Any two models with the same inputs and outputs (float vs int8, int8 vs int8). The candidate
    runs op by op in ONNX Runtime, so a Q/DQ model is measured as its graph defines it.
    Exit 1 when a gate fails (the report is written first).

    \b
    Example:
      qpass eval model.onnx model.int8.onnx --data val.npz --max-drop 1 --report eval.json
    """
    given = graph_io.parse_input_shapes(input_shape)
    _files(force, {"the reference model": reference, "the candidate model": candidate, "the --data file": data,
                   "the --preprocess file": preprocess, **_metric_file(metric_spec)}, {"--report": report})
    metric = _metric(metric_spec, min_metric)
    raw_ref, raw_cand = graph_io.load_model(reference), graph_io.load_model(candidate)
    random = is_random(data)  # random inputs need their sizes given
    source = open_source(data, input_specs(graph_io.resolve_inputs(raw_ref, given) if random else raw_ref), preprocess, seed)
    shapes = {**({} if random else shapes_from_data(raw_ref, source, set(given))), **given}  # as quantize sizes them
    ref_model, cand_model = graph_io.resolve_inputs(raw_ref, shapes), graph_io.resolve_inputs(raw_cand, shapes)
    check_loads(ref_model, str(reference))
    check_loads(cand_model, str(candidate))
    if input_specs(ref_model) != input_specs(cand_model):
        raise InputError(f"the models' inputs differ: {reference} and {candidate} must take the same tensors")
    if max_samples is not None:
        source, _ = source.split(max(0, len(source) - max_samples))
    result = compare(ref_model, cand_model, source, batch_size, metric)
    if random:  # once the run is done, so that an error is still the only line
        click.echo(RANDOM_WARNING, err=True)
    if max_drop is not None and result.metric is None:
        raise InputError("--max-drop needs a classifier (first output [N, classes]); use --min-sqnr")
    failures = result.failures(min_sqnr, max_drop, min_metric)
    if report is not None:
        graph_io.write_all({report: dumps({
            "schema": "qpass.eval", "version": 1, "reference": {"path": str(reference), "sha256": sha256(reference)},
            "candidate": {"path": str(candidate), "sha256": sha256(candidate)}, **result.to_json(),
            "gates": {"min_sqnr": min_sqnr, "max_drop": max_drop, "min_metric": min_metric, "failed": failures}})})
    if not quiet:
        click.echo(format_fidelity(result))
    if failures:
        raise GateError("gate failed: " + "; ".join(failures))


@cli.command()
@config_option
@calibration_options
@click.option("--eval-data", help="Samples to measure on (.npy/.npz, may hold `labels`) [default: the held-back part of --data].")
@click.option("--report", type=click.Path(path_type=Path), help="Write the analysis as JSON to this path.")
@click.option("--fallback", is_flag=True, help="Keep the most harmful layers in float until --min-sqnr / --max-drop hold.")
@click.option("--min-sqnr", type=FiniteFloat(), help="Fallback goal: worst-output SQNR in dB at least this.")
@click.option("--max-drop", type=FiniteFloat(min=0), help="Fallback goal: top-1 drop vs float at most this many points.")
@metric_options
@click.option("--min-int8-macs", type=FiniteFloat(min=0, max=100), default=80.0, show_default=True,
              help="Fallback goal: at least this percent of the conv/matmul MACs stay int8, or the goal does not count.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="With --fallback: write the mixed-precision model here.")
@click.option("--force", is_flag=True, help="Replace outputs that already exist (without it qpass refuses).")
def analyze(model: Path, eval_data: str | None, report: Path | None, fallback: bool, min_sqnr: float | None,
            max_drop: float | None, metric_spec: str | None, min_metric: float | None, min_int8_macs: float,
            output: Path | None, force: bool, **opts) -> None:
    """Per-layer sensitivity and ranges of MODEL for a target; with --fallback, choose float layers.

    \b
    Example:
      qpass analyze model.onnx --target snpe --data calib.npz --report analysis.json
      qpass analyze model.onnx --target snpe --data calib.npz --fallback --min-sqnr 30 -o model.mixed.onnx
    """
    if fallback and min_sqnr is None and max_drop is None and min_metric is None:
        raise InputError("--fallback needs a goal: --min-sqnr DB, --max-drop POINTS and/or --min-metric X")
    if not fallback and (min_sqnr is not None or max_drop is not None or min_metric is not None or output is not None):
        raise InputError("--min-sqnr, --max-drop, --min-metric and --output go with --fallback")
    if opts["data"] is None:
        raise InputError("qpass analyze needs calibration data (--data)")
    target, ctx = _setup(opts)
    goal = Goal(min_sqnr, max_drop, min_int8_macs / 100, min_metric) if fallback else None
    if fallback:
        output = output or model.with_name(f"{model.stem}.{target.name}.mixed.onnx")
    _files(force, {**_calibration_inputs(model, opts), "the --eval-data file": eval_data, **_metric_file(metric_spec)},
           {"-o": output, "--report": report})
    metric = _metric(metric_spec, min_metric)
    analysis, mixed = run_analyze(model, target, opts["data"], ctx, graph_io.parse_input_shapes(opts["input_shape"]),
                                  opts["holdout"], opts["preprocess"], eval_data, goal, metric)
    _warn_random(opts["data"])
    files = graph_io.model_files(mixed, output) if fallback else {}
    if report is not None:
        files[report] = dumps(analysis.to_json())
    graph_io.write_all(files)
    click.echo(format_analysis(analysis))
    if fallback:
        click.echo(f"wrote {output}", err=True)
        if not analysis.goal_met:
            share = analysis.int8_share
            if share is not None and share < goal.min_int8:
                raise GateError(f"fallback goal not met: it needs {len(analysis.fallback)} layer(s) in float, which leaves "
                                f"{100 * share:.1f}% of conv/matmul MACs in int8 (< --min-int8-macs {min_int8_macs:g})")
            raise GateError(f"fallback goal not met even with {len(analysis.fallback)} layer(s) in float")


@cli.command()
@config_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", "target_name", required=True, help="Shipped target name or path of a target .toml file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(model: Path, target_name: str, as_json: bool) -> None:
    """Check that a Q/DQ MODEL follows a target's rules, without an engine; exit 1 on a violation.

    \b
    Placement (missing Q/DQ, Q/DQ that breaks a fusion or feeds a float op), quantizer form (zero
    points, signedness, weight integer range, per-channel axis, scales, powers of two), shared
    concat/pooling scales and int32 bias scales, each with the node's name.
    Example:
      qpass check model.int8.onnx --target tensorrt
    """
    target = load_target(target_name)
    result = check_model(graph_io.load_model(model), target)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_check(result))
    if not result.ok:
        raise GateError(f"{len(result.violations)} violation(s) of {target.name}")


@cli.command("compile")
@config_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--engine", "-e", "engine_name", type=click.Choice(ENGINES), required=True)
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Artifact path [default: MODEL.ort.onnx / MODEL.plan / MODEL.so].")
@click.option("--target", "-t", "target_name", default="tvm-x86", show_default=True,
              help="tvm: the target file whose [tvm] table names the device (tvm-x86, tvm-arm, or a path).")
@click.option("--mcpu", help="tvm: LLVM CPU, overriding the target file's (e.g. cortex-a76, sapphirerapids; "
                             "'native': this machine's).")
@click.option("--mattr", metavar="+dotprod,+i8mm", help="tvm: LLVM CPU features, overriding the target file's.")
@click.option("--int-kernel", type=click.Choice(INT_KERNELS), default="auto", show_default=True,
              help="tvm: how integer convs run, all with the same results: int32 multiplies (integer), dot-product "
                   "instructions (pmaddwd: x86 AVX2; vnni512/vnni256: x86 VNNI vpdpbusd on zmm/ymm; sdot: ARM "
                   "+dotprod), or float32 FMA where the sums provably stay exact (float-exact). auto: the target's "
                   "best dot-product kernel, else integer.")
@click.option("--opt-level", type=click.Choice(["basic", "extended", "all"]), default="extended", show_default=True,
              help="onnxruntime: graph optimisations applied offline ('all' adds layouts that suit only this CPU type).")
@click.option("--input-shape", multiple=True, metavar="NAME=1x3x224x224",
              help="tensorrt: the optimisation profile's shape; tvm: the static shape (a dynamic batch is 1).")
@click.option("--workspace-mib", default=1024, show_default=True, type=click.IntRange(min=1), help="tensorrt: workspace.")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="tensorrt: let layers left float use FP16.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="tensorrt: timing cache file, read and updated.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the compile report as JSON here.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--force", is_flag=True, help="Replace outputs that already exist (without it qpass refuses).")
def compile_command(model: Path, engine_name: str, output: Path | None, target_name: str, mcpu: str | None,
                    mattr: str | None, int_kernel: str, opt_level: str, input_shape: tuple[str, ...],
                    workspace_mib: int, fp16: bool,
                    timing_cache: Path | None, report: Path | None, quiet: bool, force: bool) -> None:
    """Turn a Q/DQ MODEL into an engine artifact and say what runs in integer.

    \b
    Example:
      qpass compile model.int8.onnx --engine onnxruntime -o model.ort.onnx --report compile.json
      qpass compile model.int8.onnx --engine tensorrt -o model.plan --input-shape input=8x3x224x224
      qpass compile model.int8.onnx --engine tvm --target tvm-arm --mattr +neon,+dotprod -o model.so
    """
    expect_kind(model, "onnxruntime")  # every engine compiles from ONNX
    output = output or model.with_name(model.name.removesuffix(".onnx") + SUFFIX[engine_name])
    _files(force, {"the input model": model, "the --target file": target_name, "the --timing-cache file": timing_cache},
           {"-o": output, "--report": report})
    options = {"onnxruntime": {"opt_level": opt_level},
               "tensorrt": {"input_shapes": graph_io.parse_input_shapes(input_shape), "workspace_mib": workspace_mib,
                            "fp16": fp16, "timing_cache": timing_cache},
               "tvm": {"target": target_name, "input_shapes": graph_io.parse_input_shapes(input_shape), "mcpu": mcpu,
                       "mattr": mattr, "int_kernel": int_kernel, "quiet": quiet}}[engine_name]
    result = engine(engine_name).compile_model(model, output, **options)
    if report is not None:
        graph_io.write_all({report: dumps(result.to_json())})
    if not quiet:
        integer = ", ".join(f"{op} x{n}" for op, n in result.integer_nodes.items()) or "none"
        click.echo(f"integer kernels: {integer}", err=True)
        if result.float_nodes:
            click.echo(f"float nodes: {len(result.float_nodes)}: "
                       + ", ".join(f"{n['name']} ({n['op']})" for n in result.float_nodes), err=True)
        if engine_name == "tvm" and result.int_kernel not in ("integer", "float-exact"):
            click.echo(f"{result.int_kernel}: {result.dot_layers} integer conv(s) and matmul(s) run on the "
                       "dot-product kernel", err=True)
        if engine_name == "tvm" and result.exact_float_convs:
            click.echo(f"float-exact: {result.exact_float_convs} int8 conv(s) run on float32 FMA, exactly", err=True)
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"wrote {output}" + (f" and {output.name}.json (its inputs)" if engine_name == "tvm" else ""), err=True)


@cli.command()
@config_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--engine", "-e", "engine_name", type=click.Choice(ENGINES), required=True)
@click.option("--compare", type=click.Path(path_type=Path),
              help="A second artifact (e.g. the float model) measured in the same session, interleaved, for a ratio.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--runs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="Intra-op threads (0: the engine's default, one per physical core).")
@click.option("--input-shape", multiple=True, metavar="NAME=1x3x224x224", help="Sizes for dynamic input dimensions.")
@click.option("--number", default=1, show_default=True, type=click.IntRange(min=1),
              help="tvm: runs averaged into one timed sample (TVM's time_evaluator).")
@click.option("--min-repeat-ms", default=0, show_default=True, type=click.IntRange(min=0),
              help="tvm: raise --number until one sample lasts this long.")
@click.option("--cooldown-ms", default=0, show_default=True, type=click.IntRange(min=0),
              help="tvm: idle time before each sample (lets a board without a fan cool down).")
@click.option("--rpc", "rpc_address", metavar="HOST:PORT", help="tvm: measure on the board whose RPC server is here.")
@click.option("--tracker", metavar="HOST:PORT", help="tvm: request a board from this RPC tracker (with --key).")
@click.option("--key", help="tvm: the device key to request from --tracker.")
@click.option("--rpc-timeout", default=30.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="tvm: seconds any one RPC step (connect, request, upload, one sample) may take.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the measurements as JSON here.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--max-latency", type=FiniteFloat(min=0, min_open=True), metavar="MS",
              help="Gate: exit 1 if the model's median latency is above this many milliseconds (report written first).")
@click.option("--force", is_flag=True, help="Replace a report that already exists (without it qpass refuses).")
def bench(model: Path, engine_name: str, compare: Path | None, warmup: int, runs: int, batch_size: int, threads: int,
          input_shape: tuple[str, ...], number: int, min_repeat_ms: int, cooldown_ms: int, rpc_address: str | None,
          tracker: str | None, key: str | None, rpc_timeout: float, report: Path | None, seed: int,
          quiet: bool, max_latency: float | None, force: bool) -> None:
    """Measure the latency of a quantized MODEL (an artifact of --engine) on this device or a board.

    \b
    Examples:
      qpass bench model.ort.onnx --engine onnxruntime --compare model.onnx --threads 1 --report bench.json
      qpass bench model.so --engine tvm --rpc 192.168.1.20:9090 --compare float.so --report bench.json
      qpass bench model.so --engine tvm --tracker 10.0.0.5:9190 --key rk3588
    """
    _files(force, {"the model": model, "the --compare model": compare}, {"--report": report})
    shapes = graph_io.parse_input_shapes(input_shape)
    paths = {"model": model, **({"compare": compare} if compare else {})}
    for path in paths.values():
        expect_kind(path, engine_name)
    settings = {"batch": batch_size, "threads": threads or "default", "warmup": warmup, "runs": runs}
    options = {}
    if engine_name == "tvm":
        options = {"remote": _remote_device(rpc_address, tracker, key, rpc_timeout), "number": number,
                   "min_repeat_ms": min_repeat_ms, "cooldown_ms": cooldown_ms}
        settings.update(number=number, min_repeat_ms=min_repeat_ms, cooldown_ms=cooldown_ms)
        if options["remote"] is not None:
            settings["rpc"] = str(options["remote"].endpoint)
    elif rpc_address or tracker:
        raise InputError("--rpc and --tracker measure TVM libraries: use them with --engine tvm")
    module = engine(engine_name)
    runners = {label: module.Runner(path, threads=threads, batch=batch_size, input_shapes=shapes, seed=seed, **options)
               for label, path in paths.items()}
    if not runners["model"].quantized:
        raise InputError(f"{model} has no quantized ops: a float model (pass it with --compare next to the int8 one)")
    result = BenchResult(engine_name, runners["model"].device, settings)
    try:
        latency = measure(runners, warmup, runs, quiet)
    except IncompleteRun as exc:
        latency, result.error = exc.latency, str(exc)
    for label, path in paths.items():
        if label in latency:
            result.models[label] = {"path": str(path), "sha256": sha256(path), "latency": asdict(latency[label])}
    if compare and len(latency) == 2:
        result.speedup = latency["compare"].median_ms / latency["model"].median_ms
    if max_latency is not None and "model" in latency:
        median = latency["model"].median_ms
        failed = [f"median {median:.3f} ms > --max-latency {max_latency:g} ms"] if median > max_latency else []
        result.gates = {"max_latency": max_latency, "failed": failed}
    if report is not None:
        graph_io.write_all({report: dumps(result.to_json())})
    click.echo(format_bench(result))
    if result.error:
        kept = f"; the runs made before are in {report}" if report is not None else ""
        raise EngineError(f"measurement stopped: {result.error}{kept}")
    if result.gates and result.gates["failed"]:
        raise GateError("gate failed: " + result.gates["failed"][0])


def _remote_device(rpc_address: str | None, tracker: str | None, key: str | None, timeout: float):
    """The board named by --rpc or --tracker/--key, connected; None to measure here."""
    if rpc_address and tracker:
        raise InputError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if tracker and not key:
        raise InputError("--tracker needs --key (the device key the board's server registered)")
    if key and not tracker:
        raise InputError("--key goes with --tracker HOST:PORT")
    if not (rpc_address or tracker):
        return None
    from qpasses.targets.lower.tvm_rpc import Endpoint, open_device

    return open_device(Endpoint.parse(rpc_address or tracker, key, timeout))


@cli.command("rpc-server")
@config_option
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=9090, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on (in use: an error, unless --port-end gives a range to search).")
@click.option("--port-end", type=click.IntRange(2, 65536),
              help="Search [--port, --port-end) for the first free port, as TVM's server does [default: --port only].")
@click.option("--tracker", metavar="HOST:PORT", help="Register with this RPC tracker (with --key).")
@click.option("--key", default="", help="Device key to register under at --tracker, e.g. rk3588.")
def rpc_server(host: str, port: int, port_end: int | None, tracker: str | None, key: str) -> None:
    """Serve this device to `qpass bench --engine tvm --rpc` (TVM's RPC server; runs until stopped).

    It answers with this CPU's description too. Anyone who reaches the port can run code here:
    use it on a trusted network only.

    \b
    Example (on the board, then on the workstation):
      qpass rpc-server --port 9090
      qpass bench model.so --engine tvm --rpc 192.168.1.20:9090 --compare float.so
    """
    if tracker and not key:
        raise InputError("--tracker needs --key (the name clients request this device by)")
    port_end = port_end or port + 1
    if port_end <= port:
        raise InputError(f"--port-end {port_end} must be above --port {port}")
    from qpasses.targets.lower.tvm_rpc import serve

    server = serve(host, port, port_end, tracker, key)
    click.echo(f"serving on {host}:{server.port}" + (f", registered at {tracker} as {key}" if tracker else ""), err=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that a plain `kill` also stops the worker
    try:
        server.proc.join()
    finally:
        server.terminate()


FEW_SAMPLES = 16  # held-back samples below which a technique's keep-or-drop is mostly noise


def _print_summary(result, output: Path, methods: str) -> None:
    plan, state = result.state.plan, result.state
    echo = lambda text="": click.echo(text, err=True)  # noqa: E731 - the summary goes to stderr
    echo(f"target {state.target.name}: {len(plan.quantized_nodes)} nodes quantized, "
         f"{len(plan.activations)} activation Q/DQ, {len(plan.weights)} weights, {len(plan.biases)} int32 biases"
         + (f", {len(plan.constants)} integer constants" if plan.constants else ""))
    if plan.fused_nodes:
        echo(f"  fused into a supergroup (no Q/DQ inside) or a scale: {len(plan.fused_nodes)} node(s)")
    reasons = Counter(plan.float_nodes.values())
    for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        echo(f"  kept in float: {count:3d} node(s): {reason}")
    for note in state.notes:
        echo(f"  note: {note}")
    echo(f"calibrated on {result.calib_samples} samples ({methods})")
    for d in result.decisions:
        if not d.applied:
            echo(f"warning: {d.technique} does not apply to this model (see the notes above)")
            continue
        verdict = "kept" if d.kept else "dropped (it lowered the output SQNR)"
        echo(f"{d.technique}: {verdict}: worst-output SQNR {d.before_db:.1f} -> {d.after_db:.1f} dB")
    if any(d.applied for d in result.decisions) and result.holdout_samples < FEW_SAMPLES:
        echo(f"warning: the techniques were judged on {result.holdout_samples} held-back sample(s), too few to tell "
             f"differences of a dB apart: give more --data (1/8 is held back) or a larger --holdout")
    for name, db in result.sqnr_db.items():
        echo(f"output {name}: SQNR {db:.1f} dB on {result.holdout_samples} held-back samples")
    echo(f"wrote {output}")


def _print_coverage(engine_name: str, coverage) -> None:
    """What the engine runs of the int8 plan: the share in integer kernels, and why the rest is float."""
    click.echo(f"{engine_name}: {coverage.summary()}", err=True)
    for node in [n for n in coverage.nodes if not n.integer][:FLOAT_SHOWN]:
        click.echo(f"  runs float: {node.name} ({node.op}, {node.macs / 1e6:.1f} M MACs): {node.reason}", err=True)
    hidden = sum(not n.integer for n in coverage.nodes) - FLOAT_SHOWN
    if hidden > 0:
        click.echo(f"  ... and {hidden} more (--report lists them all)", err=True)


FLOAT_SHOWN = 10  # planned-int8 nodes that run float, listed in the summary


@cli.group(invoke_without_command=True)
@click.pass_context
def targets(ctx: click.Context) -> None:
    """List the shipped targets.

    \b
    Example:
      qpass targets
      qpass targets show tensorrt
    """
    if ctx.invoked_subcommand is None:
        for name in builtin_names():
            click.echo(f"{name:12s} {load_target(name).summary}")


@targets.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Print a target's rules (a shipped name or a .toml path).

    \b
    Example:
      qpass targets show snpe
      qpass targets show ./my-npu.toml
    """
    t = load_target(name)
    click.echo(f"{t.name}: {t.summary}")
    if t.reference:
        click.echo(f"  source: {t.reference}")
    click.echo(f"  weights:     {t.weight.describe()} ({t.weight_storage} storage)")
    click.echo(f"  activations: {t.activation.describe()}")
    click.echo(f"  bias: {t.bias}; fold BatchNorm: {t.fold_batchnorm}; "
               f"model input quantized: {t.quantize_model_input}; model output quantized: {t.quantize_model_output}")
    click.echo("  quantized op inputs:")
    for op, rule in t.ops.items():
        extra = ["shares one quantizer in/out" if rule.share else "", f"{rule.weight_granularity} weights" if rule.weight_granularity else ""]
        inputs = "all activation inputs" if rule.inputs == "all" else f"inputs {list(rule.inputs)}"
        click.echo(f"    {op:18s} {inputs}" + "".join(f"; {e}" for e in extra if e))
    if t.supergroups:
        click.echo("  supergroups (no Q/DQ inside): " + ", ".join(" + ".join(g) for g in t.supergroups))
    if t.float_ops:
        click.echo("  kept in float: " + ", ".join(t.float_ops))
    if t.float_tail:
        click.echo("  float tail: ops that no conv/matmul comes after stay float (decode, sigmoids, box/score concat)")
    click.echo(f"  shared quantizers (concat, pooling) split where members' ranges differ over {t.share_range_ratio:g}x: "
               "the op that ties them runs float")
    if t.fusion:
        click.echo("  fusion: an op runs in integer only as a whole DequantizeLinear -> op -> QuantizeLinear group; "
                   "Q/DQ only where such a group needs it" + (f"; float output allowed: {', '.join(t.fusion.float_output)}"
                                                             if t.fusion.float_output else ""))
        click.echo(f"    constant inputs stored as integers when 8 bits hold them within {100 * t.fusion.constant_error:g}%"
                   + (f"; rewritten first: {', '.join(t.fusion.decompose)}" if t.fusion.decompose else ""))
        if t.fusion.preoptimize:
            click.echo(f"    the engine's own {t.fusion.preoptimize} float rewrites run before planning")
    if t.engine:
        click.echo(f"  engine: {t.engine} (quantize reads its optimised graph back: int8 coverage)")
    if t.cpu:
        flags = cpu_flags()
        choice = next((c for c in t.cpu if c.feature in flags), None)
        click.echo(f"  this CPU: {cpu_description()}")
        click.echo(f"    {choice.feature}: use {choice.target}: {choice.why}" if choice else
                   f"    none of {', '.join(c.feature for c in t.cpu)}: this table has no advice for it")


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
def passes(as_json: bool) -> None:
    """List the graph passes in pipeline order.

    \b
    Example:
      qpass passes --json
    """
    rows = [{"name": p.name, "summary": p.summary, "requires": list(p.requires)} for p in ALL_PASSES]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        needs = f" (needs {', '.join(row['requires'])})" if row["requires"] else ""
        click.echo(f"{row['name']:16s} {row['summary']}{needs}")


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="qpass", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors too: one line, with where to find help
        command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "qpass"
        hint = f" (see '{command} --help')" if isinstance(exc, click.UsageError) else ""
        click.echo(f"qpass: error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("qpass: aborted", err=True)
        return 130
    except QpassError as exc:
        if debug:
            raise
        click.echo(f"qpass: error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        if debug:
            raise
        click.echo(f"qpass: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
