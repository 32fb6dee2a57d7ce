"""How commands print what they found: records (flat dicts with stable keys, numbers as numbers)
shown as a table at any width, or written as JSON or CSV for scripts.

A table never cuts a cell: when its columns fit the console they are laid out side by side, else
each row becomes a block of `header: value` lines (the vertical layout of psql's \\x). The
records behind a table are what --json and --csv print, so the three views never disagree."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

Record = dict[str, Any]

# Control characters from a device name, a layer or ONNX node name or a path (ESC starts the
# sequences that clear a screen or retitle a window) are shown as visible stand-ins, one for one:
# C0 as their Unicode control pictures (ESC as U+241B), DEL and C1 as U+FFFD. Newline and tab stay.
_TERMINAL_SAFE = {code: 0x2400 + code for code in range(0x20) if code not in (0x09, 0x0A)}
_TERMINAL_SAFE.update({code: 0xFFFD for code in range(0x7F, 0xA0)})


def terminal_safe(text: str) -> str:
    """Text that cannot drive the terminal it is printed on."""
    return text.translate(_TERMINAL_SAFE)


class LiteralConsole(Console):
    """A Console that prints every string and Text literally: no markup, no control sequences."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, highlight=False, **kwargs)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        safe: list[Any] = []
        for item in objects:
            if isinstance(item, str):
                item = terminal_safe(item)
            elif isinstance(item, Text):
                item = item.copy()
                item.plain = terminal_safe(item.plain)
            safe.append(item)
        super().print(*safe, **kwargs)


@dataclass(frozen=True)
class Field:
    """One column: the record key (JSON/CSV), its table header, and how a value is shown."""

    key: str
    header: str
    show: Callable[[Any], str] | None = None
    numeric: bool = False

    def text(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        if self.show is not None:
            return terminal_safe(self.show(value))
        return terminal_safe(str(value))


def ms(value: float) -> str:
    return f"{value:.3f}"


def one_decimal(value: float) -> str:
    return f"{value:.1f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def percent(value: float) -> str:
    return f"±{value * 100:.0f}%"


def scientific(value: float) -> str:
    return f"{value:.1e}"


def output_format(json_flag: bool, csv_flag: bool) -> str:
    """'table', 'json' or 'csv' from a command's --json/--csv flags."""
    if json_flag and csv_flag:
        raise typer.BadParameter("choose one of --json and --csv", param_hint="--json/--csv")
    return "json" if json_flag else "csv" if csv_flag else "table"


JSON_OPTION = typer.Option(False, "--json", help="print the results as JSON (one object per row; see README)")
CSV_OPTION = typer.Option(False, "--csv", help="print the results as CSV (a header line, then one line per row)")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan: an absent measurement is null
    return value


def write_json(payload: Any) -> None:
    def clean(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return _json_value(item)

    sys.stdout.write(json.dumps(clean(payload), indent=2) + "\n")


def write_csv(records: list[Record], fields: list[Field]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([f.key for f in fields])
    for record in records:
        row = []
        for f in fields:
            value = _json_value(record.get(f.key))
            if isinstance(value, str):
                value = terminal_safe(value)
            row.append("" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value)
        writer.writerow(row)


def column_widths(fields: list[Field], rows: list[list[str]], *, wrapped: bool = False) -> list[int]:
    """Each column's width with every cell on one line, or (wrapped) with text cells and headers
    broken at spaces, so only their longest word must fit (numbers never break)."""
    def need(text: str, can_wrap: bool) -> int:
        parts = text.split() if can_wrap else text.splitlines()
        return max((len(part) for part in parts), default=0)

    columns = list(zip(*rows)) if rows else [() for _ in fields]
    return [max([need(f.header, wrapped), *(need(cell, wrapped and not f.numeric) for cell in column)])
            for f, column in zip(fields, columns)]


def table_width(widths: list[int]) -> int:
    """Characters a table with these column widths takes (rich's box: '│ a │ b │')."""
    return sum(widths) + 3 * len(widths) + 1


def print_table(console: Console, title: Optional[str], fields: list[Field], records: Iterable[Record],
                styles: Callable[[Record, Field], str] | None = None) -> None:
    """Side by side when every cell fits on the console, else one block per record."""
    records = list(records)
    headers = [f.header for f in fields]
    cells = [[f.text(record.get(f.key)) for f in fields] for record in records]
    if title:
        console.print(Text(title, style="bold"))
    one_line = table_width(column_widths(fields, cells)) <= console.width
    least = column_widths(fields, cells, wrapped=True)
    if one_line or table_width(least) <= console.width:
        # Too wide for one line per row: text cells wrap at spaces, never narrower than their
        # longest word; numbers stay whole (fold never cuts with an ellipsis).
        table = Table(show_header=True, header_style="bold")
        for f, width in zip(fields, least):
            table.add_column(f.header, justify="right" if f.numeric else "left", no_wrap=one_line,
                             overflow="fold", width=None if one_line else width)
        for record, row in zip(records, cells):
            table.add_row(*(Text(cell, style=styles(record, f) if styles else "") for f, cell in zip(fields, row)))
        console.print(table)
        return
    label_width = max(len(h) for h in headers)
    for index, (record, row) in enumerate(zip(records, cells)):
        if index:
            console.print("")
        for f, cell in zip(fields, row):
            # soft_wrap: a long value runs on (the terminal wraps it) rather than being cut
            console.print(Text.assemble((f"{f.header:>{label_width}}", "dim"), "  ",
                                        (cell, styles(record, f) if styles else "")), soft_wrap=True)


def emit(console: Console, fmt: str, title: Optional[str], fields: list[Field], records: list[Record],
         styles: Callable[[Record, Field], str] | None = None) -> None:
    """Records as a table (with a title) or as JSON/CSV on stdout (no title, nothing else)."""
    if fmt == "json":
        write_json(records)
    elif fmt == "csv":
        write_csv(records, fields)
    else:
        print_table(console, title, fields, records, styles)
