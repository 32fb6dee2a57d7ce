"""The `autoconv` command: a thin typer + rich layer over the library.

Library errors (AutoconvError) become one red line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from autoconv.cli.db import db_app
from autoconv.cli.common import (
    DB_HELP,
    DEVICE_HELP,
    console,
    db_path_option,
    device_option,
    error_line,
    errors,
    name_filter_option,
    reports_errors,
)

app = typer.Typer(
    help="Generate, tune, run and compare convolution kernels (im2col + GEMM, implicit GEMM, direct) on your own device.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts such as "autoconv[onnx]" are shown literally
)
app.add_typer(db_app, name="db")


def _print_device(info) -> None:
    console.print(Text.assemble("device: ", (info.name, "bold"), f" ({info.platform}, driver {info.driver})"))


@app.command()
@reports_errors
def devices() -> None:
    """List the OpenCL devices found, whether each can build kernels, and which is the default."""
    from autoconv.backends.opencl import list_devices, select_device

    found = list_devices()
    if not found:
        errors.print("no OpenCL device found: run `bash scripts/install_pocl.sh` for the CPU (PoCL)")
        raise typer.Exit(1)
    default_index = select_device(None)[0].index if any(d.usable for d in found) else -1
    table = Table(title="OpenCL devices")
    for column in ("#", "platform", "device", "type", "driver", "CUs", "local mem", "max WG", "status"):
        table.add_column(column)
    for entry in found:
        info = entry.info
        status = Text("ok" + (" (default)" if entry.index == default_index else ""), style="green") if entry.usable \
            else Text(f"unusable: {entry.problem}", style="red")
        table.add_row(str(entry.index), info.platform, info.name, info.device_type, info.driver,
                      str(info.compute_units), f"{info.local_mem_bytes // 1024} KiB",
                      str(info.max_work_group_size), status)
    console.print(table)


def _layers(layer: List[str], model: Optional[str], batch: Optional[int], onnx: Optional[Path] = None) -> list:
    from autoconv.layers import model_layers, parse_layer

    if batch is not None and batch <= 0:
        raise typer.BadParameter(f"must be positive, got {batch}", param_hint="--batch")
    chosen = [parse_layer(text, batch) for text in layer]
    if model:
        chosen += model_layers(model, batch or 1)
    if onnx is not None:
        from autoconv.onnx_layers import onnx_layers

        found, skipped = onnx_layers(onnx, batch)
        for problem in skipped:
            errors.print(error_line(problem, "skipped", "yellow"))
        chosen += found
    if not chosen:
        raise typer.BadParameter("name a LAYER (e.g. resnet50/res2_3x3), --model or --onnx", param_hint="LAYER")
    return chosen


ALGORITHM_HELP = "force one algorithm: im2col_gemm, implicit_gemm, direct or im2col_blas (default: the fastest tuned)"
MODEL_HELP = "every layer of a built-in model: alexnet, vgg16, resnet18, resnet50, mobilenet_v2"
LAYER_HELP = "MODEL/NAME (e.g. resnet50/res2_3x3) or key=value pairs (e.g. n=1,c=64,h=56,w=56,k=64,r=3,s=3,pad=1)"


@app.command()
@reports_errors
def compare(
    layer: List[str] = typer.Argument(None, help=LAYER_HELP, show_default=False),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    repeats: int = typer.Option(5, min=1, help="timed runs per method (the median is reported)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP + "; tuned params of each algorithm come from it"),
) -> None:
    """Every algorithm on each layer (direct loops, im2col + BLAS, im2col + generated GEMM, implicit
    GEMM): time, GFLOP/s, extra memory, error, and the plan autoconv serves."""
    from autoconv.algorithms import DIRECT
    from autoconv.backends import get_backend
    from autoconv.compare import compare_layer
    from autoconv.serve.api import choose_plan

    layers = _layers(layer or [], model, batch)
    backend = get_backend("opencl", device_option(device))
    _print_device(backend.device)
    for named in layers:
        spec = named.spec
        with console.status(f"measuring {named.label} ..."):
            rows = compare_layer(spec, backend, repeats=repeats, db=db)
        direct_ms = next((row.median_ms for row in rows if row.algorithm == DIRECT), None)
        table = Table(title=f"{named.label}: {spec}  ({spec.flops / 1e9:.3f} GFLOP)", title_justify="left")
        for column in ("method", "ms", "GFLOP/s", "vs direct", "extra memory", "rel. error"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in rows:
            extra = "none"
            if row.scratch_bytes:
                extra = f"{row.scratch_bytes / 2**20:.1f} MiB ({row.scratch_bytes / spec.input_bytes:.1f}x input)"
            check = Text(f"{row.rel_error:.1e}") if row.verified else Text(f"{row.rel_error:.1e} WRONG", style="red")
            table.add_row(row.method, f"{row.median_ms:.3f}", f"{row.gflops:.1f}",
                          f"{direct_ms / row.median_ms:.1f}x" if direct_ms else "-", extra, check)
        console.print(table)
        served = choose_plan(spec, backend, db)
        console.print(f"  served plan: {served.describe()}", style="dim")


@app.command()
@reports_errors
def run(
    layer: str = typer.Argument(..., help=LAYER_HELP),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    repeats: int = typer.Option(10, min=1, help="timed runs (the median is reported)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    backend_name: str = typer.Option("opencl", "--backend", help="opencl or cuda"),
    algorithm: Optional[str] = typer.Option(None, help=ALGORITHM_HELP),
) -> None:
    """Run one layer with autoconv's plan for it, check it against the float64 reference, time it."""
    from autoconv.algorithms import get_algorithm
    from autoconv.backends import get_backend
    from autoconv.compare import measure
    from autoconv.serve.api import backend_for, choose_plan
    from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output

    (named,) = _layers([layer], None, batch)
    spec = named.spec
    if algorithm is not None:
        get_algorithm(algorithm)
    backend = get_backend(backend_name, device_option(device))
    plan = choose_plan(spec, backend, db, algorithm=algorithm)
    runner = backend_for(plan, backend)
    conv = runner.prepare(spec, plan)  # checks the device's limits before any host array is made
    operands = random_operands(spec)
    result = measure("autoconv", runner, spec, plan, operands, reference_output(spec, operands), repeats=repeats,
                     conv=conv)
    console.print(f"{named.label}: {spec}")
    console.print(f"  device  {result.device}\n  plan    {result.plan}")
    console.print(f"  time    {result.median_ms:.3f} ms (median of {repeats})  {result.gflops:.1f} GFLOP/s")
    console.print(f"  check   relative error {result.rel_error:.1e} vs float64 reference (limit {TOLERANCE:.0e})")
    if not result.verified:
        errors.print(error_line("the result does not match the reference"))
        raise typer.Exit(1)


@app.command()
@reports_errors
def tune(
    layer: List[str] = typer.Argument(None, help=LAYER_HELP, show_default=False),
    layer_option: List[str] = typer.Option(None, "--layer", help="a layer, as LAYER (repeatable)", show_default=False),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    onnx: Optional[Path] = typer.Option(None, help="every Conv node of an ONNX model (needs autoconv[onnx])"),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    backend_name: str = typer.Option("opencl", "--backend", help="opencl or cuda"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    trials: Optional[int] = typer.Option(None, min=1, help="measured configs per layer (default 60 without --time-budget)"),
    time_budget: Optional[str] = typer.Option(None, help="wall time for all layers, e.g. 90s, 10m, 1h"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    repeats: int = typer.Option(7, min=1, help="timed runs per config (the median counts)"),
    seed: int = typer.Option(0, help="sampler and data seed"),
    algorithm: List[str] = typer.Option(None, "--algorithm", help="tune only these algorithms (repeatable; "
                                        "default: every one that supports the layer)", show_default=False),
) -> None:
    """Autotune every algorithm per layer with Optuna; each algorithm's best goes to the DB, and the
    fastest is what autoconv serves.

    Each algorithm's default is measured first; then the trials (--trials per layer) go in turn
    to the tunable algorithms within 2x of the best time so far. Interrupted runs resume where
    they stopped: run the same command again.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoconv.algorithms import get_algorithm
    from autoconv.backends import get_backend
    from autoconv.cli.common import parse_duration, speedup
    from autoconv.store import SQLiteStore
    from autoconv.tuning.tuner import LayerReport, tune_layers

    if backend_name not in ("opencl", "cuda"):
        raise typer.BadParameter(f"expected opencl or cuda, got {backend_name!r}", param_hint="--backend")
    for name in algorithm or []:
        get_algorithm(name)
    budget_s = parse_duration(time_budget) if time_budget is not None else None
    if trials is None and budget_s is None:
        trials = 60
    named_layers = _layers([*(layer or []), *(layer_option or [])], model, batch, onnx)
    unique: dict = {}
    for named in named_layers:
        unique.setdefault(named.spec, named.label)
    chosen = [(label, spec) for spec, label in unique.items()]
    backend = get_backend(backend_name, device_option(device))
    path = db_path_option(db)
    _print_device(backend.device)
    console.print(f"tuning {len(chosen)} layer(s) into {path}")

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[best]}", markup=False), TimeElapsedColumn())
    tasks: dict[str, int] = {}
    with SQLiteStore(path) as database, Progress(*columns, console=console, transient=False) as bar:
        def start(label: str, spec: object) -> None:
            tasks[label] = bar.add_task(label, total=trials, best="defaults ...")

        def update(report: LayerReport, total: int) -> None:
            best = report.best
            text = "no verified config yet" if best is None else f"best {best.algorithm} {best.median_ms:.3f} ms"
            bar.update(tasks[report.label], completed=report.trials, best=text)

        reports = tune_layers(chosen, backend, database, trials=trials, time_budget_s=budget_s, seed=seed,
                              repeats=repeats, algorithms=tuple(algorithm) if algorithm else None,
                              progress=update, on_layer_start=start)
        for report in reports:
            update(report, trials or 0)

    table = Table(title=f"tuned on {backend.device.name}", title_justify="left")
    for column in ("layer", "trials", "fastest", "ms", "best generated", "ms", "vs its default", "baseline ms",
                   "fastest vs baseline", "failed", "wall s"):
        table.add_column(column, justify="left" if column in ("layer", "fastest", "best generated") else "right")
    for report in reports:
        best, generated, baseline = report.best, report.best_generated, report.baseline
        failed = str(sum(report.failures.values()))
        table.add_row(
            report.label, str(report.trials), best.algorithm if best else "-", f"{best.median_ms:.3f}" if best else "-",
            generated.algorithm if generated else "-", f"{generated.median_ms:.3f}" if generated else "-",
            speedup(generated.default_ms, generated.median_ms) if generated else "-",
            f"{baseline.median_ms:.3f}" if baseline else "-",
            speedup(baseline.median_ms, best.median_ms) if baseline and best else "-", failed, f"{report.wall_s:.0f}")
    console.print(table)


@app.command("export")
@reports_errors
def export_command(
    layer: List[str] = typer.Argument(None, help=LAYER_HELP, show_default=False),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    all_layers: bool = typer.Option(False, "--all", help="every layer tuned for the device in the DB"),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    device: Optional[str] = typer.Option(None, help="a device in the DB (part of its name); default: this machine's default OpenCL device"),
    out: Path = typer.Option(..., help="output directory (created; an earlier export there is replaced)"),
    reference: bool = typer.Option(False, help="also write input, weight, bias and expected output per layer (float32 files)"),
) -> None:
    """Write tuned kernels as standalone .cl/.cu sources with manifest.json and a C header."""
    from autoconv.algorithms import get_algorithm
    from autoconv.errors import TuningDBError
    from autoconv.export import ExportEntry, export
    from autoconv.plan import Plan
    from autoconv.render import template_hash
    from autoconv.serve.session import lookup
    from autoconv.store import SQLiteStore, device_from_row, fastest

    path = db_path_option(db)
    device = name_filter_option(device)
    if path.is_dir():
        raise TuningDBError(f"tuning database {path} is a directory, not a database file")
    if not path.is_file():
        raise TuningDBError(f"tuning database {path} does not exist (run `autoconv tune` first, or pass --db)")
    if not all_layers and not layer and not model:
        raise typer.BadParameter("name a LAYER, --model or --all", param_hint="LAYER")
    with SQLiteStore(path, readonly=True) as database:
        rows = database.devices()
        if device is not None:
            rows = [r for r in rows if device.lower() in r["name"].lower() or device == r["fingerprint"]]
            if len(rows) != 1:
                found = ", ".join(r["name"] for r in database.devices()) or "none"
                raise TuningDBError(f"device: {len(rows)} devices in {path} match {device!r} (devices there: {found})")
            info = device_from_row(rows[0])
        else:
            from autoconv.backends import get_backend

            info = get_backend("opencl").device
        results = [r for r in database.results(device=info.fingerprint(), template_hash=template_hash())
                   if get_algorithm(r.algorithm).device_kernels]
    entries = []
    if all_layers:
        if not results:
            raise TuningDBError(f"{path} holds no result made with the current templates for {info.name}")
        by_layer: dict = {}
        for r in results:
            by_layer.setdefault(r.spec, []).append(r)
        for spec, found in by_layer.items():
            best = fastest(found)
            entries.append(ExportEntry(str(spec), spec, Plan(best.algorithm, best.params, "tuned"), True))
    for named in (_layers(layer or [], model, batch) if (layer or model) else []):
        plan = lookup(named.spec, info, path, generated_only=True, shipped=False)
        tuned = plan.source == "tuned"
        if not tuned:
            errors.print(error_line(f"{named.label} is not tuned for {info.name}; exporting the fallback "
                                    f"plan ({plan.source})", "note:", "yellow"))
        entries.append(ExportEntry(named.label, named.spec, plan, tuned))
    unique = {(e.spec, e.plan): e for e in entries}
    manifest = export(unique.values(), info, out, reference=reference)
    files = sum(len(layer_row["kernels"]) for layer_row in manifest["layers"])
    console.print(f"exported {len(manifest['layers'])} layer(s), {files} kernel source(s) for {info.name} to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
