"""`autoconv db ...`: look into, merge and prune tuning databases."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from autoconv.cli_common import DB_HELP, console, db_path_option, errors, name_filter_option, reports_errors, speedup

db_app = typer.Typer(help="List, show, merge and prune tuning databases.", no_args_is_help=True, rich_markup_mode=None)


def _open_existing(db: Optional[Path], *, readonly: bool = True):  # -> TuningDB
    """An existing database; read-only unless the command changes it (then it is also upgraded)."""
    from autoconv.errors import TuningDBError
    from autoconv.tuning_db import TuningDB

    path = db_path_option(db)
    if path.is_dir():
        raise TuningDBError(f"tuning database {path} is a directory, not a database file")
    if not path.is_file():
        raise TuningDBError(f"tuning database {path} does not exist (run `autoconv tune` first, or pass --db)")
    return TuningDB(path, readonly=readonly)


def _device_rows(database, device: Optional[str]) -> list[dict]:
    from autoconv.errors import TuningDBError

    rows = database.devices()
    device = name_filter_option(device)
    if device is not None:
        rows = [r for r in rows if device.lower() in r["name"].lower() or device == r["fingerprint"]]
        if not rows:
            raise TuningDBError(f"device: no device in {database.path} matches {device!r}")
    return rows


@db_app.command("list")
@reports_errors
def list_results(
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    device: Optional[str] = typer.Option(None, help="only devices whose name contains this"),
) -> None:
    """Tuned layers per device: tuned time, GFLOP/s and speed-ups over the default and the baseline."""
    from autoconv.render import template_hash

    current = template_hash()
    with _open_existing(db) as database:
        results = database.results()
        for row in _device_rows(database, device):
            mine = [r for r in results if r.device == row["fingerprint"]]
            table = Table(title=f"{row['name']} ({row['platform']}, driver {row['driver']})", title_justify="left")
            for column in ("layer", "tuned ms", "GFLOP/s", "vs default", "baseline", "vs baseline", "trials", "templates"):
                table.add_column(column, justify="left" if column in ("layer", "baseline", "templates") else "right")
            for r in mine:
                tuned = "baseline wins" if r.params is None else f"{r.median_ms:.3f}"
                table.add_row(str(r.spec), tuned, f"{r.gflops:.1f}", speedup(r.default_ms, r.median_ms), r.baseline,
                              speedup(r.baseline_ms, r.median_ms), str(r.trials),
                              "current" if r.template_hash == current else Text("stale", style="yellow"))
            console.print(table)
            if not mine:
                console.print("  no verified results", style="dim")


@db_app.command()
@reports_errors
def show(
    layer: str = typer.Argument(..., help="MODEL/NAME or key=value pairs, as for `autoconv run`"),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    device: Optional[str] = typer.Option(None, help="only devices whose name contains this"),
) -> None:
    """One layer: its winning params per device and what every measured config came to."""
    from collections import Counter

    from autoconv.layers import parse_layer

    spec = parse_layer(layer, batch).spec
    with _open_existing(db) as database:
        results = [r for r in database.results() if r.spec == spec]
        found = False
        for row in _device_rows(database, device):
            measured = list(database.measurements(row["fingerprint"], spec))
            mine = [r for r in results if r.device == row["fingerprint"]]
            if not measured and not mine:
                continue
            found = True
            console.print(Text.assemble((row["name"], "bold"), f" ({row['platform']}, driver {row['driver']})"))
            for r in mine:
                params = "baseline wins" if r.params is None else " ".join(f"{k}={v}" for k, v in r.params.as_dict().items())
                console.print(f"  best  {r.median_ms:.3f} ms ({r.gflops:.1f} GFLOP/s), default {r.default_ms or 0:.3f} ms, "
                              f"{r.baseline} {r.baseline_ms or 0:.3f} ms, {r.trials} trials, rel. error {r.rel_error:.1e}",
                              highlight=False)
                console.print(f"  params {params}")
                console.print(f"  templates {r.template_hash}, autoconv {r.autoconv_version}, {r.created}", style="dim",
                              highlight=False)
            statuses = Counter(m["status"] for m in measured)
            console.print("  measured configs: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common()))
        if not found:
            errors.print(f"{spec} has no results in {database.path}")
            raise typer.Exit(1)


@db_app.command()
@reports_errors
def merge(
    sources: List[Path] = typer.Argument(..., help="databases to merge in (e.g. from other machines)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP + "; created if absent"),
) -> None:
    """Merge databases into one, keeping the best verified result per key."""
    from autoconv.errors import TuningDBError
    from autoconv.tuning_db import TuningDB

    target_path = db_path_option(db)
    for source in sources:
        if source.is_dir():
            raise TuningDBError(f"{source} is a directory, not a database file")
        if not source.is_file():
            raise TuningDBError(f"{source} does not exist")
        if source.resolve() == target_path.resolve():
            raise TuningDBError(f"{source} is the target database itself")
    with TuningDB(target_path) as target:
        for source in sources:
            with TuningDB(source, readonly=True) as other:
                stored, kept = target.merge_from(other)
            console.print(f"{source}: {stored} result(s) merged, {kept} kept (already as good or better)")


@db_app.command()
@reports_errors
def prune(
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    stale: bool = typer.Option(True, help="delete results made with other template versions"),
    device: Optional[str] = typer.Option(None, help="also delete every result of devices whose name contains this"),
) -> None:
    """Delete results that can no longer be served (older templates) or of a device."""
    from autoconv.render import template_hash

    with _open_existing(db, readonly=False) as database:
        deleted = database.prune(current_template_hash=template_hash()) if stale else 0
        if device is not None:
            for row in _device_rows(database, device):
                deleted += database.prune(device=row["fingerprint"])
        console.print(f"{deleted} result(s) deleted from {database.path}")
