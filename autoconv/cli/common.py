"""What every `autoconv` command shares: the consoles, error reporting, option parsing."""

from __future__ import annotations

import functools
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.text import Text

from autoconv.cli.output import LiteralConsole
from autoconv.errors import AutoconvError

# Markup off: device names, paths, layer names and messages are printed literally (a name such
# as "a[/]b" is text, not a tag). Colour comes from styles and Text objects.
# Control characters are shown as visible stand-ins (output.terminal_safe).
console = LiteralConsole()
errors = LiteralConsole(stderr=True)


def error_line(message: str, label: str = "error:", style: str = "bold red") -> Text:
    """One literal message behind a coloured label."""
    return Text.assemble((label, style), " ", message)

F = TypeVar("F", bound=Callable[..., None])


# typer's own click (vendored): its exception classes, reached through public names.
_CLICK_EXCEPTIONS = sys.modules[typer.BadParameter.__module__]
UsageError: type[Exception] = typer.BadParameter.__mro__[1]


class OneLineUsageErrors(TyperGroup):
    """The command group whose usage errors (an option value out of range, a bad argument, an
    unknown command) are one line and exit code 2, as every other error is: no usage block.
    A bare command still shows its help."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _CLICK_EXCEPTIONS.NoArgsIsHelpError as exc:
            exc.show()
            result = 2
        except UsageError as exc:
            context = getattr(exc, "ctx", None)
            prefix = f"{context.command_path}: " if context is not None else ""
            errors.print(error_line(prefix + exc.format_message()), soft_wrap=True)  # type: ignore[attr-defined]
            result = 2
        except typer.Abort:  # Ctrl-C or end of input outside a command's own handling
            errors.print("interrupted")
            result = 130
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


def reports_errors(command: F) -> F:
    """Turn an AutoconvError into one clear line and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _print_warning
                command(*args, **kwargs)
        except AutoconvError as exc:
            errors.print(error_line(str(exc)), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_warning(message: Warning | str, category: type, filename: str, lineno: int,
                   file: object = None, line: object = None) -> None:
    """A warning as one literal line on stderr (no file name and source line of autoconv's code)."""
    text = str(message)
    errors.print(error_line(text[len("autoconv: "):] if text.startswith("autoconv: ") else text, "warning:", "yellow"),
                 soft_wrap=True)


def device_option(value: Optional[str]) -> int | str | None:
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter("expected a device index or part of a device name, got an empty string",
                                 param_hint="--device")
    return int(value) if value.strip().isdigit() else value


DEVICE_HELP = "OpenCL device: an index from `autoconv devices` or part of its name (default: first GPU, else first working device)"


DB_HELP = "tuning database (default: $AUTOCONV_DB, else autoconv's file in your user cache dir)"


def db_path_option(value: Optional[Path]) -> Path:
    from autoconv.settings import settings

    return value if value is not None else settings().db_path


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "10m" or "1h" (a precise BadParameter otherwise)."""
    raw = text.strip().lower()
    if not raw:
        raise typer.BadParameter("expected a duration such as 90s, 10m or 1h, got an empty string",
                                 param_hint="--time-budget")
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise typer.BadParameter(f"expected a duration such as 90s, 10m or 1h, got {text!r}",
                                 param_hint="--time-budget") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise typer.BadParameter(f"must be a positive, finite duration, got {text!r}", param_hint="--time-budget")
    return seconds


def speedup(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def name_filter_option(value: Optional[str], hint: str = "--device") -> Optional[str]:
    """A device-name fragment; an empty one would match every device, so it is refused."""
    if value is not None and not value.strip():
        raise typer.BadParameter("expected part of a device name, got an empty string", param_hint=hint)
    return value


def runner_layout(model: Path, batch: Optional[int], backend: str, device: int | str | None) -> str:
    """The layout `autoconv.onnx.load` runs the graph in on that device (at `batch`); NCHW where the
    graph cannot be prepared (the load itself then says why)."""
    from autoconv.graph.prepare import UnsupportedModelError, load_proto, prepare, with_batch
    from autoconv.graph.runner import model_layout

    try:
        proto = load_proto(model)
        prepared = prepare(with_batch(proto, batch) if batch is not None else proto)
    except UnsupportedModelError:
        return "NCHW"
    return model_layout(backend, device, prepared)


def runs_in_layout(spec: Any, backend: Any) -> bool:
    """Whether any algorithm of the backend runs the layer in its spec's layout."""
    from autoconv.serve.lookup import runs_in_layout as runs

    return runs(spec, backend.device, backend.algorithms)


def served_spec(spec: Any, layout: str, backend: Any) -> Any:
    """The layer as a model in `layout` computes it (lookup.computed_spec): in that layout where an
    algorithm runs it there and its input fills the blocks, else in NCHW between reorders."""
    from autoconv.serve.lookup import computed_spec

    return computed_spec(spec.replace(layout=layout), backend.device, backend.algorithms)
