"""The `qpass` command line.

Every user-facing failure is one line on stderr and a documented exit code (see errors.py);
`--debug` shows tracebacks and checks the graph after every pass.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

from qpasses import __version__
from qpasses.calibration.data import RANDOM_WARNING, random_source
from qpasses.calibration.observers import OBSERVERS
from qpasses.errors import InputError, QpassError
from qpasses.targets.schema import builtin_names, load_target

from . import graph as graph_io
from .pass_infra import PassContext
from .pipeline import ALL_PASSES, Techniques, quantize as run_quantize


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qpass")
def cli() -> None:
    """qpass: quantize float ONNX models for a deployment target."""


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", "target_name", default="onnxruntime", show_default=True,
              help="Shipped target name (see `qpass targets`) or path of a target .toml file.")
@click.option("--calib", default="minmax", show_default=True, type=click.Choice(sorted(OBSERVERS)),
              help="Range-setting method for activations (MQBench app. C.1).")
@click.option("--weight-calib", default="minmax", show_default=True, type=click.Choice(sorted(OBSERVERS)),
              help="Range-setting method for weights.")
@click.option("--quantile", type=float, help="Quantile for --calib/--weight-calib quantile [default: 0.9999].")
@click.option("--meanstd-k", type=float, help="k of mean +/- k*std for meanstd [default: 3].")
@click.option("--data", "-d",
              help="Calibration inputs: a .npy/.npz file, a directory of them, a directory of images, "
                   "or 'random[:N]' (a smoke test, not calibration).")
@click.option("--preprocess", type=click.Path(path_type=Path), help="Preprocessing spec (TOML) for an image directory.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output path [default: MODEL.<target>.int8.onnx].")
@click.option("--input-shape", multiple=True, metavar="NAME=1x3x224x224", help="Sizes for dynamic input dimensions.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--max-samples", type=click.IntRange(min=1), help="Use at most this many calibration samples.")
@click.option("--holdout", type=click.IntRange(min=0), help="Samples held back to measure output SQNR [default: 1/8, at most 64].")
@click.option("--cle", is_flag=True, help="Cross-layer equalization (kept only if it does not lower the output SQNR).")
@click.option("--cle-replace-relu6", is_flag=True, help="Let --cle turn ReLU6 into ReLU to equalize across it.")
@click.option("--bias-correction", is_flag=True, help="Empirical bias correction (kept only if it helps).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for every random choice.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")
@click.option("--debug", is_flag=True, help="Check the graph after every pass; show tracebacks.")
def quantize(model: Path, target_name: str, calib: str, weight_calib: str, quantile: float | None,
             meanstd_k: float | None, data: str | None, preprocess: Path | None, output: Path | None,
             input_shape: tuple[str, ...], batch_size: int, max_samples: int | None, holdout: int | None,
             cle: bool, cle_replace_relu6: bool, bias_correction: bool, seed: int, quiet: bool, debug: bool) -> None:
    """Quantize MODEL for a target and write a Q/DQ ONNX model.

    \b
    Example:
      qpass quantize model.onnx --target tensorrt --calib kl --data calib.npz -o model.int8.onnx
    """
    target = load_target(target_name)
    output = output or model.with_name(f"{model.stem}.{target.name}.int8.onnx")
    if model.exists() and output.resolve() == model.resolve():
        raise InputError(f"output {output} is the input model; qpass never overwrites its input")
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise InputError(f"--quantile must be in (0, 1], got {quantile}")
    if meanstd_k is not None and meanstd_k <= 0:
        raise InputError(f"--meanstd-k must be positive, got {meanstd_k}")
    options = {k: v for k, v in {"q": quantile, "k": meanstd_k}.items() if v is not None}
    ctx = PassContext(calib_method=calib, weight_calib=weight_calib, calib_options=options, batch_size=batch_size, max_samples=max_samples, seed=seed, quiet=quiet, debug=debug)
    if data is not None and (data == "random" or data.startswith("random:")):
        random_source(data, [], seed)  # checks the spec before the warning
        click.echo(RANDOM_WARNING, err=True)
    techniques = Techniques(cle=cle, cle_replace_relu6=cle_replace_relu6, bias_correction=bias_correction)
    result = run_quantize(model, target, data, ctx, graph_io.parse_input_shapes(input_shape), holdout, preprocess,
                          techniques)
    graph_io.save_model(result.model, output)
    if not quiet:
        _print_summary(result, output, f"{calib} activations, {weight_calib} weights")


def _print_summary(result, output: Path, methods: str) -> None:
    plan, state = result.state.plan, result.state
    echo = lambda text="": click.echo(text, err=True)  # noqa: E731 - the summary goes to stderr
    echo(f"target {state.target.name}: {len(plan.quantized_nodes)} nodes quantized, "
         f"{len(plan.activations)} activation Q/DQ, {len(plan.weights)} weights, {len(plan.biases)} int32 biases")
    if plan.fused_nodes:
        echo(f"  fused into a supergroup (no Q/DQ inside): {len(plan.fused_nodes)} node(s)")
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
    for name, db in result.sqnr_db.items():
        echo(f"output {name}: SQNR {db:.1f} dB on {result.holdout_samples} held-back samples")
    echo(f"wrote {output}")


@cli.group(invoke_without_command=True)
@click.pass_context
def targets(ctx: click.Context) -> None:
    """List the shipped targets."""
    if ctx.invoked_subcommand is None:
        for name in builtin_names():
            click.echo(f"{name:12s} {load_target(name).summary}")


@targets.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Print a target's rules (a shipped name or a .toml path)."""
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
        extra = [f"shares one quantizer in/out" if rule.share else "", f"{rule.weight_granularity} weights" if rule.weight_granularity else ""]
        inputs = "all activation inputs" if rule.inputs == "all" else f"inputs {list(rule.inputs)}"
        click.echo(f"    {op:18s} {inputs}" + "".join(f"; {e}" for e in extra if e))
    if t.supergroups:
        click.echo("  supergroups (no Q/DQ inside): " + ", ".join(" + ".join(g) for g in t.supergroups))
    if t.float_ops:
        click.echo("  kept in float: " + ", ".join(t.float_ops))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
def passes(as_json: bool) -> None:
    """List the graph passes in pipeline order."""
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
    except click.ClickException as exc:
        exc.show()
        return 2
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
