"""`autoconv model ...`: whole ONNX models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from autoconv.cli.common import DB_HELP, DEVICE_HELP, console, db_path_option, device_option, parse_duration, reports_errors
from autoconv.cli.output import JSON_OPTION, Field, emit, ms, write_json

model_app = typer.Typer(help="Run whole ONNX models.", no_args_is_help=True, rich_markup_mode=None)

STEP_FIELDS = [Field("name", "step"), Field("ops", "ops"), Field("runs_on", "runs on"),
               Field("ms", "ms", ms, numeric=True), Field("plan", "plan")]
OP_FIELDS = [Field("ops", "ops"), Field("ms", "ms", ms, numeric=True),
             Field("share", "share", lambda v: f"{v * 100:.1f}%", numeric=True)]


@model_app.command()
@reports_errors
def bench(
    model: Path = typer.Argument(..., help="an ONNX model file"),
    batch: Optional[int] = typer.Option(None, min=1, help="batch size (every input's first dimension)"),
    tune_first: bool = typer.Option(False, "--tune-first", help="tune the model's convolutions into --db first"),
    time_budget: str = typer.Option("5m", help="with --tune-first: wall time for all layers, e.g. 90s, 5m "
                                               "(a bare number is seconds)"),
    rounds: int = typer.Option(5, min=1, help="interleaved rounds (autoconv, onnxruntime)"),
    repeats: int = typer.Option(5, min=1, help="timed runs per method per round (the median is kept)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    layout: Optional[str] = typer.Option(None, help="keep the tensors between convolutions channel-blocked: "
                                         "NCHW16c, NCHW8c or NCHW4c, or NCHW for none (default: the device's, as autoconv.onnx.load chooses)"),
    plot: Optional[Path] = typer.Option(None, help="also draw per-step bars to this PNG or SVG "
                                        "(needs matplotlib: autoconv's [plot] extra)"),
    json_flag: bool = JSON_OPTION,
) -> None:
    """End-to-end latency of MODEL on autoconv and on onnxruntime (default session options, the
    same thread count) on the same random input: the outputs compared, the time per op type and
    per step, and which conv layers ran on fallback (untuned) plans."""
    from autoconv.graph.compare import compare_model
    from autoconv.graph.prepare import UnsupportedModelError

    if not model.is_file():
        raise UnsupportedModelError(f"MODEL: {model} is not a file")
    plot_path = None
    if plot is not None:
        from autoconv.plots import check_output_path

        plot_path = check_output_path(plot)
    from autoconv.layouts import LAYOUTS

    if layout is not None and layout not in LAYOUTS:
        raise typer.BadParameter(f"expected one of {', '.join(LAYOUTS)}, got {layout!r}", param_hint="--layout")
    budget_s = parse_duration(time_budget)
    path = db_path_option(db)
    out = console if not json_flag else None
    if tune_first:
        _tune(model, batch, budget_s, device, path, layout)
    result = compare_model(model, batch=batch, rounds=rounds, repeats=repeats, db=str(path),
                           device=device_option(device), name=model.name, layout=layout)
    if json_flag:
        write_json(result.as_dict())
    else:
        assert out is not None
        out.print(Text(f"{model.name} at batch {result.batch}: autoconv {result.autoconv.median_ms:.2f} ms "
                       f"±{result.autoconv.spread * 100:.0f}%, onnxruntime {result.onnxruntime.median_ms:.2f} ms "
                       f"±{result.onnxruntime.spread * 100:.0f}%: {result.speed:.2f}x onnxruntime's speed; "
                       f"largest relative error {result.error:.1e}; non-conv share {result.non_conv_share * 100:.1f}%"),
                  soft_wrap=True)
        total = sum(result.per_op.values()) or 1.0
        emit(console, "table", "time per op type (one timed run)", OP_FIELDS,
             [{"ops": k, "ms": v, "share": v / total} for k, v in sorted(result.per_op.items(), key=lambda kv: -kv[1])])
        emit(console, "table", "time per step", STEP_FIELDS,
             [{"name": r.name, "ops": r.ops, "runs_on": r.runs_on, "ms": t, "plan": r.plan} for r, t in result.steps])
        if result.fallbacks:
            out.print(Text(f"{len(result.fallbacks)} conv layer(s) ran on fallback plans (untuned): "
                           + ", ".join(r.name for r in result.fallbacks)
                           + f". Tune them with: autoconv model bench {model} --tune-first"), soft_wrap=True)
    if plot_path is not None:
        from autoconv.plots import model_steps_figure

        model_steps_figure([(f"{r.name} {r.ops}", t, r.runs_on) for r, t in result.steps],
                           f"{model.name}: time per step (autoconv)", plot_path)
        if out is not None:
            out.print(f"plot written to {plot_path}", soft_wrap=True)


def _tune(model: Path, batch: Optional[int], budget_s: float, device: Optional[str], path: Path,
          layout: Optional[str] = None) -> None:
    from autoconv.backends import get_backend
    from autoconv.onnx_layers import onnx_layers
    from autoconv.store import SQLiteStore
    from autoconv.tuning.tuner import tune_layers

    from autoconv.cli.common import runner_layout, served_spec

    layers, _ = onnx_layers(model, batch)
    backend = get_backend("opencl", device_option(device))
    layout = layout or runner_layout(model, batch, "opencl", device_option(device))

    distinct = {served_spec(layer.spec, layout, backend): layer for layer in layers}
    with console.status(f"tuning {len(distinct)} distinct conv layers for {budget_s:.0f} s ..."), SQLiteStore(path) as database:
        tune_layers([(layer.label, spec) for spec, layer in distinct.items()], backend, database, trials=None,
                    time_budget_s=budget_s)
