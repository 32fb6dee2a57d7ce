"""`autoconv db ...`: look into, merge and prune tuning databases."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from autoconv.cli.common import DB_HELP, console, db_path_option, errors, name_filter_option, reports_errors, speedup

db_app = typer.Typer(help="List, show, merge and prune tuning databases.", no_args_is_help=True, rich_markup_mode=None)


def _open_existing(db: Optional[Path], *, readonly: bool = True):  # -> SQLiteStore
    """An existing database; read-only unless the command changes it (then it is also upgraded)."""
    from autoconv.errors import TuningDBError
    from autoconv.store import SQLiteStore

    path = db_path_option(db)
    if path.is_dir():
        raise TuningDBError(f"tuning database {path} is a directory, not a database file")
    if not path.is_file():
        raise TuningDBError(f"tuning database {path} does not exist (run `autoconv tune` first, or pass --db)")
    return SQLiteStore(path, readonly=readonly)


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
    """Tuned layers per device: each algorithm's best (the served one marked), GFLOP/s, speed-up over
    its default config and over the library baseline, trials, and whether the templates are current."""
    from autoconv.algorithms import BASELINE
    from autoconv.render import template_hash
    from autoconv.store import fastest

    current = template_hash()
    with _open_existing(db) as database:
        results = database.results()
        for row in _device_rows(database, device):
            mine = [r for r in results if r.device == row["fingerprint"]]
            table = Table(title=f"{row['name']} ({row['platform']}, driver {row['driver']})", title_justify="left")
            for column in ("layer", "algorithm", "ms", "GFLOP/s", "vs default", "vs baseline", "trials", "templates"):
                table.add_column(column, justify="left" if column in ("layer", "algorithm", "templates") else "right")
            layers: dict = {}
            for r in mine:
                layers.setdefault((r.spec, r.template_hash), []).append(r)
            for (spec, templates), found in layers.items():
                served = fastest(found)
                baseline = next((r for r in found if r.algorithm == BASELINE), None)
                for r in sorted(found, key=lambda r: r.median_ms):
                    name = Text(r.algorithm + (" (served)" if r is served and templates == current else ""),
                                style="bold" if r is served else "")
                    table.add_row(str(spec), name, f"{r.median_ms:.3f}", f"{r.gflops:.1f}",
                                  speedup(r.default_ms, r.median_ms),
                                  speedup(baseline.median_ms, r.median_ms) if baseline else "-", str(r.trials),
                                  "current" if templates == current else Text("stale", style="yellow"))
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
    """One layer: each algorithm's best params per device and what every measured config came to."""
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
            for r in sorted(mine, key=lambda r: r.median_ms):
                default = f", default {r.default_ms:.3f} ms" if r.default_ms else ""
                console.print(f"  {r.algorithm}: best {r.median_ms:.3f} ms ({r.gflops:.1f} GFLOP/s){default}, "
                              f"{r.trials} trials, rel. error {r.rel_error:.1e}")
                console.print(f"    params {r.params.describe() or '(none)'}")
                console.print(f"    templates {r.template_hash}, autoconv {r.autoconv_version}, {r.created}", style="dim")
            for name in sorted({m["algorithm"] for m in measured}):
                statuses = Counter(m["status"] for m in measured if m["algorithm"] == name)
                console.print(f"  {name} measured configs: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common()))
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
    from autoconv.store import SQLiteStore

    target_path = db_path_option(db)
    for source in sources:
        if source.is_dir():
            raise TuningDBError(f"{source} is a directory, not a database file")
        if not source.is_file():
            raise TuningDBError(f"{source} does not exist")
        if source.resolve() == target_path.resolve():
            raise TuningDBError(f"{source} is the target database itself")
    with SQLiteStore(target_path) as target:
        for source in sources:
            with SQLiteStore(source, readonly=True) as other:
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
