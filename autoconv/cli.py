"""The `autoconv` command: a thin typer + rich layer over the library.

Library errors (AutoconvError) become one red line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from autoconv.errors import AutoconvError

app = typer.Typer(
    help="Generate, run and compare im2col + GEMM convolution kernels on your own device.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., None])


def reports_errors(command: F) -> F:
    """Turn an AutoconvError into one clear line and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except AutoconvError as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _device_option(value: Optional[str]) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


DEVICE_HELP = "OpenCL device: an index from `autoconv devices` or part of its name (default: first GPU, else first working device)"


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
        status = ("[green]ok[/]" + (" (default)" if entry.index == default_index else "")) if entry.usable \
            else f"[red]unusable: {entry.problem}[/]"
        table.add_row(str(entry.index), info.platform, info.name, info.device_type, info.driver,
                      str(info.compute_units), f"{info.local_mem_bytes // 1024} KiB",
                      str(info.max_work_group_size), status)
    console.print(table)


def _layers(layer: List[str], model: Optional[str], batch: Optional[int]) -> list:
    from autoconv.layers import model_layers, parse_layer

    if batch is not None and batch <= 0:
        raise typer.BadParameter(f"must be positive, got {batch}", param_hint="--batch")
    chosen = [parse_layer(text, batch) for text in layer]
    if model:
        chosen += model_layers(model, batch or 1)
    if not chosen:
        raise typer.BadParameter("name a LAYER (e.g. resnet50/res2_3x3) or --model", param_hint="LAYER")
    return chosen


LAYER_HELP = "MODEL/NAME (e.g. resnet50/res2_3x3) or key=value pairs (e.g. n=1,c=64,h=56,w=56,k=64,r=3,s=3,pad=1)"


@app.command()
@reports_errors
def compare(
    layer: List[str] = typer.Argument(None, help=LAYER_HELP, show_default=False),
    model: Optional[str] = typer.Option(None, help="every layer of a built-in model: alexnet, vgg16, resnet50, mobilenet_v2"),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    repeats: int = typer.Option(5, min=1, help="timed runs per method (the median is reported)"),
) -> None:
    """Direct loops vs im2col + numpy BLAS vs im2col + generated GEMM: time, GFLOP/s, memory."""
    from autoconv.backends import get_backend
    from autoconv.compare import compare_layer

    layers = _layers(layer or [], model, batch)
    backend = get_backend("opencl", _device_option(device))
    console.print(f"device: [bold]{backend.device.name}[/] ({backend.device.platform}, driver {backend.device.driver})")
    for named in layers:
        spec = named.spec
        with console.status(f"measuring {named.label} ..."):
            rows = compare_layer(spec, backend, repeats=repeats)
        direct_ms = rows[0].median_ms
        table = Table(title=f"{named.label}: {spec}  ({spec.flops / 1e9:.3f} GFLOP)", title_justify="left")
        for column in ("method", "ms", "GFLOP/s", "vs direct", "extra memory", "rel. error"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in rows:
            extra = f"{row.scratch_bytes / 2**20:.1f} MiB ({spec.im2col_overhead:.1f}x input)" if row.scratch_bytes else "none"
            check = f"{row.rel_error:.1e}" if row.verified else f"[red]{row.rel_error:.1e} WRONG[/]"
            table.add_row(row.method, f"{row.median_ms:.3f}", f"{row.gflops:.1f}", f"{direct_ms / row.median_ms:.1f}x",
                          extra, check)
        console.print(table)
        console.print(f"  generated GEMM plan: {rows[2].plan}", style="dim", highlight=False)


@app.command()
@reports_errors
def run(
    layer: str = typer.Argument(..., help=LAYER_HELP),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    repeats: int = typer.Option(10, min=1, help="timed runs (the median is reported)"),
) -> None:
    """Run one layer with autoconv's plan for it, check it against the float64 reference, time it."""
    from autoconv.api import choose_plan
    from autoconv.backends import get_backend
    from autoconv.compare import TOLERANCE, measure, random_operands, reference_output

    (named,) = _layers([layer], None, batch)
    spec = named.spec
    backend = get_backend("opencl", _device_option(device))
    operands = random_operands(spec)
    result = measure("autoconv", backend, spec, choose_plan(spec, backend), operands,
                     reference_output(spec, operands), repeats=repeats)
    console.print(f"{named.label}: {spec}")
    console.print(f"  device  {result.device}\n  plan    {result.plan}", highlight=False)
    console.print(f"  time    {result.median_ms:.3f} ms (median of {repeats})  {result.gflops:.1f} GFLOP/s")
    console.print(f"  check   relative error {result.rel_error:.1e} vs float64 reference (limit {TOLERANCE:.0e})")
    if not result.verified:
        errors.print("[bold red]error:[/] the result does not match the reference")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
