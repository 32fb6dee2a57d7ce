"""What every `autoconv` command shares: the consoles, error reporting, option parsing."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer
from rich.console import Console

from autoconv.errors import AutoconvError

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


def device_option(value: Optional[str]) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


DEVICE_HELP = "OpenCL device: an index from `autoconv devices` or part of its name (default: first GPU, else first working device)"


DB_HELP = "tuning database (default: $AUTOCONV_DB, else autoconv's file in your user cache dir)"


def db_path_option(value: Optional[Path]) -> Path:
    from autoconv.settings import settings

    return value if value is not None else settings().db_path


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "10m" or "1h" (a precise BadParameter otherwise)."""
    raw = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise typer.BadParameter(f"expected a duration such as 90s, 10m or 1h, got {text!r}",
                                 param_hint="--time-budget") from None
    if seconds <= 0:
        raise typer.BadParameter(f"must be positive, got {text!r}", param_hint="--time-budget")
    return seconds


def speedup(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"
