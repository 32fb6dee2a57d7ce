"""The `autoconv` command: a thin typer + rich layer over the library.

Library errors (AutoconvError) become one red line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import TaskID
from rich.text import Text

from autoconv.cli.db import db_app
from autoconv.cli.model import model_app
from autoconv.tuning.build_pool import DEFAULT_JOBS

# `autoconv tune --onnx/--model` with neither --trials nor --time-budget: this long in all.
MODEL_TIME_BUDGET_S = 300.0
# A time budget is the command's wall time: the search stops this long before it ends, for the
# last layer's re-timing and the report (a few seconds on PoCL for ResNet-50's largest layers).
FINISH_RESERVE_S = 5.0
from autoconv.cli.common import (
    DB_HELP,
    DEVICE_HELP,
    OneLineUsageErrors,
    console,
    db_path_option,
    device_option,
    error_line,
    errors,
    name_filter_option,
    reports_errors,
)
from autoconv.cli.output import (
    CSV_OPTION,
    JSON_OPTION,
    Field,
    emit,
    ms,
    one_decimal,
    output_format,
    ratio,
    scientific,
    write_json,
)

app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Generate, tune, run and compare convolution kernels (im2col + GEMM, implicit GEMM, direct) on your own device.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts such as "[onnx] extra" are shown literally
)
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")


def _show_version(value: bool) -> None:
    if value:
        from autoconv import __version__

        console.print(f"autoconv {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                      help="print autoconv's version and exit")) -> None:
    """Generate, tune, run and compare convolution kernels (im2col + GEMM, implicit GEMM, Winograd,
    direct) on your own device."""


def _print_device(out: Console, info) -> None:
    out.print(Text.assemble("device: ", (info.name, "bold"), f" ({info.platform}, driver {info.driver})"))


def _info_console(fmt: str) -> Console:
    """Where a command's notes go: stdout beside a table, stderr when stdout carries JSON/CSV."""
    return console if fmt == "table" else errors


@contextlib.contextmanager
def _status(text: str) -> Iterator[None]:
    """A spinner on a terminal's stderr; nothing when stderr is piped (no partial-line noise)."""
    if errors.is_terminal:
        with errors.status(text):
            yield
    else:
        yield


VERBOSE_OPTION = typer.Option(False, "--verbose", help="also print what the kernel compiler said (warnings)")


def _print_compiler_output(backends: list, verbose: bool) -> None:
    if not verbose:
        return
    for backend in backends:
        for entry, text in getattr(backend, "compiler_output", []):
            errors.print(Text(f"compiler output for {entry}:", style="dim"))
            errors.print(text, soft_wrap=True)


def _tune_argument(named: Any) -> str | None:
    """How `autoconv tune` is told this layer: MODEL/NAME (with --batch), or its key=value form."""
    from autoconv.layers import layer_text

    if named.model != "custom":
        return shlex.quote(named.label) + ("" if named.spec.n == 1 else f" --batch {named.spec.n}")
    text = layer_text(named.spec)
    return None if text is None else shlex.quote(text)


def _db_argument(db: Optional[Path]) -> str:
    """` --db PATH`, quoted so that a pasted hint runs `autoconv tune` and nothing else."""
    return "" if db is None else f" --db {shlex.quote(str(db))}"


def _fallback_hint(untuned: list[tuple[Any, str]], device_name: str, db: Optional[Path]) -> None:
    """Said once per command: which layers run a fallback plan here, and the command that tunes them."""
    if not untuned:
        return
    labels = [named.label for named, _ in untuned]
    shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
    sources = sorted({source for _, source in untuned})
    db_part = _db_argument(db)
    commands = [f"autoconv tune {argument}{db_part}" for named, _ in untuned[:3]
                if (argument := _tune_argument(named)) is not None]
    how = "; ".join(commands) if commands else "autoconv tune with the layer as key=value pairs"
    errors.print(error_line(f"{shown}: not tuned on {device_name}; served a fallback plan ({'; '.join(sources)}). "
                            f"Tune with: {how}", "hint:", "cyan"), soft_wrap=True)


@app.command()
@reports_errors
def devices(json_flag: bool = JSON_OPTION, csv_flag: bool = CSV_OPTION) -> None:
    """List the OpenCL devices found, whether each can build kernels, how host arrays reach their
    kernels (shared, mapped or staged), and which is the default."""
    from autoconv.backends.opencl import list_devices, select_device

    fmt = output_format(json_flag, csv_flag)
    found = list_devices()
    if not found:
        errors.print("no OpenCL device found: run `bash scripts/install_pocl.sh` for the CPU (PoCL)")
        raise typer.Exit(1)
    default_index = select_device(None)[0].index if any(d.usable for d in found) else -1
    records = [{"index": entry.index, "platform": entry.info.platform, "device": entry.info.name,
                "type": entry.info.device_type, "driver": entry.info.driver,
                "compute_units": entry.info.compute_units, "local_mem_kib": entry.info.local_mem_bytes // 1024,
                "max_work_group": entry.info.max_work_group_size, "host_memory": entry.host_memory,
                "usable": entry.usable, "default": entry.index == default_index, "problem": entry.problem or None}
               for entry in found]
    fields = [Field("index", "#", numeric=True), Field("platform", "platform"), Field("device", "device"),
              Field("type", "type"), Field("driver", "driver"), Field("compute_units", "CUs", numeric=True),
              Field("local_mem_kib", "local mem KiB", numeric=True), Field("max_work_group", "max WG", numeric=True),
              Field("host_memory", "host memory"), Field("usable", "status", show=lambda usable: "ok" if usable else "unusable"),
              Field("default", "default", show=lambda d: "yes" if d else ""), Field("problem", "problem")]
    if all(r["problem"] is None for r in records):
        fields.pop()
    emit(console, fmt, "OpenCL devices", fields, records,
         styles=lambda r, f: ("green" if r["usable"] else "red") if f.key == "usable" else "")


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


def _layouts_option(text: Optional[str]) -> Optional[list[str]]:
    """--layouts "NCHW,NCHW16c" as a list, each checked (None: not given)."""
    from autoconv.layouts import LAYOUTS

    if text is None:
        return None
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    wrong = [part for part in chosen if part not in LAYOUTS]
    if wrong or not chosen:
        raise typer.BadParameter(f"expected layouts among {', '.join(LAYOUTS)}, comma-separated; got {text!r}",
                                 param_hint="--layouts")
    return list(dict.fromkeys(chosen))


ALGORITHM_HELP = ("force one algorithm: im2col_gemm, implicit_gemm, winograd, direct or im2col_blas "
                  "(default: the fastest tuned)")
MODEL_HELP = "every layer of a built-in model: alexnet, vgg16, resnet18, resnet50, mobilenet_v2"
LAYER_HELP = "MODEL/NAME (e.g. resnet50/res2_3x3) or key=value pairs (e.g. n=1,c=64,h=56,w=56,k=64,r=3,s=3,pad=1)"

COMPARE_FIELDS = [
    Field("algorithm", "algorithm"), Field("ms", "ms", ms, numeric=True), Field("gflops", "GFLOP/s", one_decimal, numeric=True),
    Field("vs_direct", "vs direct", ratio, numeric=True), Field("extra_mib", "extra MiB", lambda v: f"{v:.1f}", numeric=True),
    Field("extra_vs_input", "x input", lambda v: f"{v:.1f}x", numeric=True),
    Field("rel_error", "rel. error", scientific, numeric=True), Field("served", "served", lambda v: "yes" if v else ""),
]
ROLLUP_FIELDS = [
    Field("algorithm", "algorithm"), Field("layers", "layers", numeric=True), Field("total_ms", "total ms", ms, numeric=True),
    Field("geomean_vs_direct", "geomean vs direct", ratio, numeric=True),
    Field("geomean_vs_baseline", "geomean vs im2col_blas", ratio, numeric=True),
    Field("served_on", "served on", numeric=True),
]


@app.command()
@reports_errors
def compare(
    layer: List[str] = typer.Argument(None, help=LAYER_HELP, show_default=False),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    repeats: int = typer.Option(5, min=1, help="timed runs per method (the median is reported)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP + "; tuned params of each algorithm come from it"),
    plot: Optional[Path] = typer.Option(None, help="also draw time per method and the roofline to this PNG or SVG "
                                        "(needs matplotlib: autoconv's [plot] extra)"),
    json_flag: bool = JSON_OPTION,
    csv_flag: bool = CSV_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Every algorithm on each layer (direct loops, im2col + BLAS, im2col + generated GEMM, implicit
    GEMM, Winograd, register-blocked direct, depthwise direct): time, GFLOP/s, extra memory, error, and the plan autoconv
    serves; with several
    layers, a roll-up (total time per algorithm, geomean speed-ups, what each layer is served)."""
    from autoconv.backends import get_backend
    from autoconv.compare import layer_records

    fmt = output_format(json_flag, csv_flag)
    out = _info_console(fmt)
    plot_path = None
    if plot is not None:
        from autoconv.plots import check_output_path

        plot_path = check_output_path(plot)
    layers = _layers(layer or [], model, batch)
    backend = get_backend("opencl", device_option(device))
    _print_device(out, backend.device)
    records, served_rows, untuned = [], [], []
    for named in layers:
        with _status(f"measuring {named.label} ..."):
            rows, served = layer_records(named.label, named.spec, backend, repeats, db)
        if served.source != "tuned":
            untuned.append((named, served.source))
        served_rows.append({"layer": named.label, "algorithm": served.algorithm, "plan": served.describe(),
                            "source": served.source})
        records += rows
        if fmt == "table":
            spec = named.spec
            emit(console, fmt, f"{named.label}: {spec}  ({spec.flops / 1e9:.3f} GFLOP)", COMPARE_FIELDS, rows,
                 styles=lambda r, f: "red" if f.key == "rel_error" and not r["verified"] else
                 ("bold" if r["served"] else ""))
            legend = "; ".join(f"{r['algorithm']} = {r['method']}" for r in rows)
            console.print(Text(f"  {legend}", style="dim"))
            console.print(Text(f"  served plan: {served.describe()}", style="dim"))
    from autoconv.compare import rollup as compare_rollup

    rollup = compare_rollup(records) if len(layers) > 1 else []
    if fmt == "json":
        write_json({"device": backend.device.name, "measurements": records, "rollup": rollup, "served": served_rows})
    elif fmt == "csv":
        emit(console, fmt, None, [Field("layer", "layer"), Field("method", "method"), *COMPARE_FIELDS,
                                  Field("verified", "verified"), Field("traffic_bytes", "traffic bytes")], records)
    elif rollup:
        emit(console, fmt, f"all {len(layers)} layers", ROLLUP_FIELDS, rollup)
    if plot_path is not None:
        _compare_plot(records, backend, plot_path)
        out.print(f"plot written to {plot_path}", soft_wrap=True)
    _fallback_hint(untuned, backend.device.name, db)
    _print_compiler_output([backend], verbose)


def _compare_plot(records: list[dict[str, Any]], backend: Any, path: Path | None, roofs: Any = None) -> bytes:
    from autoconv.plots import MethodPoint, compare_figure
    from autoconv.roofline import measure_roofs

    with _status("measuring the device's peak and bandwidth ..."):
        roofs = roofs or measure_roofs(backend)
    points = [MethodPoint(r["layer"], r["algorithm"], r["ms"], r["gflops"], r["intensity"]) for r in records
              if r["intensity"]]
    return compare_figure(points, roofs, f"{backend.device.name}: time per call and roofline", path)


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
    json_flag: bool = JSON_OPTION,
    csv_flag: bool = CSV_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Run one layer with autoconv's plan for it, check it against the float64 reference, time it."""
    from autoconv.algorithms import get_algorithm
    from autoconv.backends import get_backend
    from autoconv.compare import measure
    from autoconv.serve.api import backend_for, choose_plan
    from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output

    fmt = output_format(json_flag, csv_flag)
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
    record = {"layer": named.label, "shape": str(spec), "device": result.device, "algorithm": plan.algorithm,
              "plan": result.plan, "plan_source": plan.source, "ms": result.median_ms, "repeats": repeats,
              "gflops": result.gflops, "rel_error": result.rel_error, "limit": TOLERANCE, "verified": result.verified}
    if fmt == "table":
        console.print(f"{named.label}: {spec}")
        console.print(f"  device  {result.device}\n  plan    {result.plan}")
        console.print(f"  time    {result.median_ms:.3f} ms (median of {repeats})  {result.gflops:.1f} GFLOP/s")
        console.print(f"  check   relative error {result.rel_error:.1e} vs float64 reference (limit {TOLERANCE:.0e})")
    else:
        emit(console, fmt, None, [Field(key, key) for key in record], [record])
    if plan.source not in ("tuned", "host") and algorithm is None:
        _fallback_hint([(named, plan.source)], backend.device.name, db)
    _print_compiler_output([backend], verbose)
    if not result.verified:
        errors.print(error_line("the result does not match the reference"))
        raise typer.Exit(1)


TUNE_FIELDS = [
    Field("layer", "layer"), Field("trials", "trials", numeric=True), Field("fastest", "fastest"),
    Field("fastest_ms", "fastest ms", ms, numeric=True), Field("best_generated", "best generated"),
    Field("best_generated_ms", "best generated ms", ms, numeric=True), Field("vs_default", "vs its default", ratio, numeric=True),
    Field("baseline_ms", "baseline ms", ms, numeric=True), Field("vs_baseline", "fastest vs baseline", ratio, numeric=True),
    Field("failed", "failed", numeric=True), Field("wall_s", "wall s", lambda v: f"{v:.0f}", numeric=True),
]


def tune_record(report: Any) -> dict[str, Any]:
    best, generated, baseline = report.best, report.best_generated, report.baseline
    return {"layer": report.label, "shape": str(report.spec), "trials": report.trials,
            "fastest": best.algorithm if best else None, "fastest_ms": best.median_ms if best else None,
            "best_generated": generated.algorithm if generated else None,
            "best_generated_ms": generated.median_ms if generated else None,
            "vs_default": generated.default_ms / generated.median_ms if generated and generated.default_ms else None,
            "baseline_ms": baseline.median_ms if baseline else None,
            "vs_baseline": baseline.median_ms / best.median_ms if baseline and best else None,
            "failed": sum(report.failures.values()), "wall_s": report.wall_s, "seeded": report.seeded,
            "ranked": report.ranked, "raced": report.raced, "carried_from": report.carried_from or None,
            "trials_by_algorithm": dict(report.trials_by_algorithm)}


@app.command()
@reports_errors
def tune(
    layer: List[str] = typer.Argument(None, help=LAYER_HELP, show_default=False),
    layer_option: List[str] = typer.Option(None, "--layer", help="a layer, as LAYER (repeatable)", show_default=False),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    onnx: Optional[Path] = typer.Option(None, help="every Conv node of an ONNX model (needs onnx: autoconv's [onnx] extra)"),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    backend_name: str = typer.Option("opencl", "--backend", help="opencl or cuda"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    trials: Optional[int] = typer.Option(None, min=1, help="measured configs per layer (default 60 without --time-budget; "
                                         "with --onnx or --model and neither, a 5m budget)"),
    time_budget: Optional[str] = typer.Option(None, help="the command's wall time, e.g. 90s, 10m, 1h (a bare number "
                                              "is seconds; it may run over by every layer's defaults); with --onnx or "
                                              "--model it follows the model: each layer's share is its count in the "
                                              "model times its time"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    repeats: int = typer.Option(7, min=1, help="timed runs per config (the median counts)"),
    seed: int = typer.Option(0, help="sampler and data seed"),
    algorithm: List[str] = typer.Option(None, "--algorithm", help="tune only these algorithms (repeatable; "
                                        "default: every one that supports the layer)", show_default=False),
    layouts: Optional[str] = typer.Option(None, help="tune each layer in these layouts too, comma-separated: "
                                          "NCHW, NCHW4c, NCHW8c, NCHW16c (each is its own layer in the database; "
                                          "default: the layer's own, NCHW unless LAYER says layout=; with --onnx, the layout "
                                          "autoconv.onnx.load runs the model in)"),
    warm_start: bool = typer.Option(True, help="seed each new study with the winners of similar tuned layers "
                                    "(this database and the shipped ones)"),
    early_stop: bool = typer.Option(True, help="stop tuning an algorithm on a layer once it has stalled "
                                    "(no 5% gain in 30 trials), leaving the time to other layers"),
    cost_model: bool = typer.Option(True, help="measure first, after each algorithm's default, the configs a "
                                    "cost model trained on the databases' measurements predicts fastest"),
    racing: bool = typer.Option(True, help="time a search candidate fully only if its first short sample "
                                "could still beat the layer's best"),
    sampler: str = typer.Option("tpe", help="how new studies propose configs: tpe (Optuna's TPE) or random"),
    jobs: int = typer.Option(DEFAULT_JOBS, min=1, help="builder processes compiling candidates ahead "
                             "(1: everything in this process, one thing at a time)"),
    storage: Optional[str] = typer.Option(None, help="an Optuna storage shared by several tuners: a "
                                          "postgresql:// / mysql:// / sqlite:/// URL or a journal file path "
                                          "(default: a journal beside --db)", show_default=False),
    json_flag: bool = JSON_OPTION,
    csv_flag: bool = CSV_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Autotune every algorithm per layer with Optuna; each algorithm's best goes to the DB, and the
    fastest is what autoconv serves.

    Each algorithm's default is measured first; then the trials (--trials per layer) go in turn
    to the tunable algorithms within 2x of the best time so far. Interrupted runs resume where
    they stopped: run the same command again. Progress goes to stderr: a bar per layer on a
    terminal, else one line per layer as it finishes.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoconv.algorithms import get_algorithm
    from autoconv.backends import get_backend
    from autoconv.cli.common import parse_duration, runs_in_layout
    from autoconv.store import SQLiteStore
    from autoconv.tuning.tuner import EARLY_STOP_GAIN, EARLY_STOP_TRIALS, LayerReport, tune_layers

    command_started = time.monotonic()
    fmt = output_format(json_flag, csv_flag)
    out = _info_console(fmt)
    if backend_name not in ("opencl", "cuda"):
        raise typer.BadParameter(f"expected opencl or cuda, got {backend_name!r}", param_hint="--backend")
    if sampler not in ("tpe", "random"):
        raise typer.BadParameter(f"expected tpe or random, got {sampler!r}", param_hint="--sampler")
    for name in algorithm or []:
        get_algorithm(name)
    budget_s = parse_duration(time_budget) if time_budget is not None else None
    if storage is not None:  # before the database is created: a refused run leaves nothing behind
        from autoconv.tuning.study import check_storage

        check_storage(storage)
    if trials is None and budget_s is None:
        if model is not None or onnx is not None:  # a whole model: a wait a user can plan on
            budget_s = MODEL_TIME_BUDGET_S
        else:
            trials = 60
    named_layers = _layers([*(layer or []), *(layer_option or [])], model, batch, onnx)
    chosen_layouts = _layouts_option(layouts)
    backend = get_backend(backend_name, device_option(device))
    if chosen_layouts is None and onnx is not None:
        # The layers autoconv.onnx.load will serve: in the layout it keeps the model's tensors in,
        # where an algorithm runs the layer there (NCHW where none does, as the runner computes it).
        from autoconv.cli.common import runner_layout, served_spec
        from autoconv.layers import NamedLayer

        layout = runner_layout(onnx, batch, backend_name, device_option(device))
        named_layers = [NamedLayer(named.model, named.name, served_spec(named.spec, layout, backend))
                        for named in named_layers]
    unique: dict = {}
    occurrences: Counter = Counter()  # how many of the model's layers each distinct one stands for
    for named in named_layers:
        for spec in ([named.spec] if chosen_layouts is None else [named.spec.replace(layout=l) for l in chosen_layouts]):
            if spec.layout != named.spec.layout and not runs_in_layout(spec, backend):
                errors.print(error_line(f"{named.label}: no algorithm runs it in {spec.layout}", "skipped", "yellow"),
                             soft_wrap=True)
                continue
            unique.setdefault(spec, named.label if spec.layout == named.spec.layout else f"{named.label} {spec.layout}")
            occurrences[spec] += 1
    chosen = [(label, spec) for spec, label in unique.items()]
    # The budget follows the model: each distinct layer weighed by its count.
    counts = [occurrences[spec] for _, spec in chosen] if model is not None or onnx is not None else None
    path = db_path_option(db)
    _print_device(out, backend.device)
    out.print(f"tuning {len(chosen)} layer(s) into {path}", soft_wrap=True)

    def summary(report: LayerReport) -> str:
        best = report.best
        text = "no verified config" if best is None else f"best {best.algorithm} {best.median_ms:.3f} ms"
        source = f" ({report.carried_from}'s winners: the same convolution)" if report.carried_from else ""
        return f"{report.trials} trials{source}, {text}, {report.wall_s:.0f} s"

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[best]}", markup=False), TimeElapsedColumn())
    tasks: dict[str, TaskID] = {}
    live = errors.is_terminal
    bar = Progress(*columns, console=errors, transient=False) if live else None
    with SQLiteStore(path) as database, (bar if bar is not None else contextlib.nullcontext()):
        def start(label: str, spec: object) -> None:
            if bar is not None:
                tasks[label] = bar.add_task(label, total=trials, best="defaults ...")

        def update(report: LayerReport, total: int) -> None:
            if bar is None:
                return
            best = report.best
            text = "no verified config yet" if best is None else f"best {best.algorithm} {best.median_ms:.3f} ms"
            bar.update(tasks[report.label], completed=report.trials, best=text)

        defaults_task: list[TaskID] = []

        def defaults(done: int, total: int) -> None:
            if bar is None:
                if done == 0:
                    errors.print(f"measuring every algorithm's default on each of the {total} layers first "
                                 "(the time budget is then shared out)", soft_wrap=True)
                return
            if not defaults_task:
                defaults_task.append(bar.add_task("defaults of every layer", total=total, best=""))
            bar.update(defaults_task[0], completed=done)
            if done == total:
                bar.stop_task(defaults_task[0])

        estimates: list[float] = []

        def estimated(ms: float) -> None:
            """The model's estimated convolution time, falling as its layers are tuned."""
            estimates.append(ms)
            # A time budget measures every layer's defaults first: the first estimate is theirs.
            text = f"{ms:.2f} ms" + (f" (after the defaults: {estimates[0]:.2f} ms)"
                                     if len(estimates) > 1 and budget_s is not None else "")
            if bar is None:
                errors.print(f"the model's convolutions, estimated: {text}", soft_wrap=True)
                return
            if not estimate_task:
                estimate_task.append(bar.add_task("model estimate", total=None, best=text))
            bar.update(estimate_task[0], best=text)

        estimate_task: list[TaskID] = []

        def finished(report: LayerReport) -> None:
            if bar is not None:  # the layer's timer stops with it
                bar.update(tasks[report.label], completed=report.trials, total=max(report.trials, 1),
                           best=summary(report))
                bar.stop_task(tasks[report.label])
            else:
                errors.print(f"{report.label}: {summary(report)}", soft_wrap=True)

        if budget_s is not None:  # what reading the model and opening the device took counts too
            budget_s = max(budget_s - (time.monotonic() - command_started) - FINISH_RESERVE_S, 0.01)
        reports = tune_layers(chosen, backend, database, trials=trials, time_budget_s=budget_s, seed=seed,
                              repeats=repeats, algorithms=tuple(algorithm) if algorithm else None,
                              progress=update, on_layer_start=start, on_layer_end=finished, on_defaults=defaults,
                              warm_start=warm_start,
                              early_stop=(EARLY_STOP_TRIALS, EARLY_STOP_GAIN) if early_stop else None,
                              jobs=jobs, storage=storage, counts=counts, on_estimate=estimated, racing=racing,
                              cost_model=cost_model, sampler=sampler)
    emit(console, fmt, f"tuned on {backend.device.name}", TUNE_FIELDS, [tune_record(r) for r in reports])
    _print_compiler_output([backend], verbose)


@app.command()
@reports_errors
def explain(
    layer: str = typer.Argument(..., help=LAYER_HELP),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    repeats: int = typer.Option(5, min=1, help="timed runs per method (the median is reported)"),
    html: Optional[Path] = typer.Option(None, help="also write the report with its plots to this HTML file "
                                        "(needs matplotlib: autoconv's [plot] extra)"),
) -> None:
    """Why this layer runs the way it does on this device: FLOPs, the bytes each method must move,
    arithmetic intensity against the measured compute and memory limits, measured times, and the
    served plan with the reason it won."""
    from autoconv.backends import get_backend
    from autoconv.compare import explanation, layer_records
    from autoconv.roofline import measure_roofs

    if html is not None:
        from autoconv.plots import check_output_path

        check_output_path(html, (".html", ".htm"), "--html")
    (named,) = _layers([layer], None, batch)
    backend = get_backend("opencl", device_option(device))
    with _status(f"measuring {named.label} ..."):
        records, served = layer_records(named.label, named.spec, backend, repeats, db)
        roofs = measure_roofs(backend)
    from autoconv.serve.session import default_session

    session, fingerprint = default_session(), backend.device.fingerprint()
    tuned = []  # what the databases the lookup read hold for this layer here (the user's, then shipped)
    for path in session.database_paths(db):
        tuned = [r for r in session.contents(path).results if r.device == fingerprint and r.spec == named.spec]
        if tuned:
            break
    lines = [f"device: {backend.device.name} ({backend.device.platform}, driver {backend.device.driver})",
             *explanation(named.label, named.spec, records, served, roofs, tuned,
                             f"autoconv tune {_tune_argument(named) or 'LAYER'}" + _db_argument(db))]
    for line in lines:
        console.print(line, soft_wrap=True)
    if html is not None:
        _write_html(html, lines, _compare_plot(records, backend, None, roofs))
        console.print(f"report written to {html}", soft_wrap=True)


def _write_html(path: Path, lines: list[str], png: bytes) -> None:
    """The report as one self-contained HTML file (the plot embedded), written whole."""
    import base64
    import html as html_text

    from autoconv.plots import write_atomically

    body = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>autoconv explain</title></head><body>\n"
            f"<pre>{html_text.escape(chr(10).join(lines))}</pre>\n"
            f"<img alt='time per method and roofline' src='data:image/png;base64,{base64.b64encode(png).decode()}'>\n"
            "</body></html>\n")
    write_atomically(path, body.encode("utf-8"))


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
            assert best is not None  # every layer here has a result
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
