"""`autoconv db ...`: look into, merge and prune tuning databases."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from autoconv.cli.common import DB_HELP, console, db_path_option, errors, name_filter_option, reports_errors
from autoconv.cli.output import CSV_OPTION, JSON_OPTION, Field, emit, ms, one_decimal, output_format, percent, ratio, scientific

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


LIST_FIELDS = [
    Field("layer", "layer"), Field("algorithm", "algorithm"), Field("served", "served", lambda v: "yes" if v else ""),
    Field("ms", "ms", ms, numeric=True), Field("spread", "spread", percent, numeric=True),
    Field("gflops", "GFLOP/s", one_decimal, numeric=True), Field("vs_default", "vs default", ratio, numeric=True),
    Field("vs_baseline", "vs baseline", ratio, numeric=True), Field("trials", "trials", numeric=True),
    Field("templates", "templates"), Field("note", "note"),
]


@db_app.command("list")
@reports_errors
def list_results(
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    device: Optional[str] = typer.Option(None, help="only devices whose name contains this"),
    json_flag: bool = JSON_OPTION,
    csv_flag: bool = CSV_OPTION,
) -> None:
    """Tuned layers per device: each algorithm's best (the served one marked), its spread, GFLOP/s,
    speed-up over its default config and over the library baseline, trials, and whether the
    templates are current."""
    from autoconv.algorithms import BASELINE
    from autoconv.layers import layer_name
    from autoconv.render import template_hash
    from autoconv.serve.lookup import trusted
    from autoconv.store import fastest

    fmt = output_format(json_flag, csv_flag)
    current = template_hash()
    records: list[dict] = []
    with _open_existing(db) as database:
        results = database.results()
        for row in _device_rows(database, device):
            mine = [r for r in results if r.device == row["fingerprint"]]
            layers: dict = {}
            for r in mine:
                layers.setdefault((r.spec, r.template_hash), []).append(r)
            device_records = []
            for (spec, templates), found in layers.items():
                counted = trusted(found)
                served = fastest(counted)
                incomplete = "" if counted else "tuning incomplete: only direct loops measured; the lookup falls back"
                baseline = next((r for r in found if r.algorithm == BASELINE), None)
                for r in sorted(found, key=lambda r: r.median_ms):
                    device_records.append({
                        "device": row["name"], "layer": layer_name(spec), "key": spec.key(), "algorithm": r.algorithm,
                        "served": r is served and templates == current, "ms": r.median_ms, "spread": r.spread,
                        "repeats": r.repeats, "gflops": r.gflops, "vs_default": r.speedup_vs_default,
                        "vs_baseline": baseline.median_ms / r.median_ms if baseline else None, "trials": r.trials,
                        "params": r.params.as_dict(), "templates": "current" if templates == current else "stale",
                        "note": incomplete or ("unsteady (busy cores?)" if r.unsteady else "")})
            if fmt == "table":
                emit(console, fmt, f"{row['name']} ({row['platform']}, driver {row['driver']})", LIST_FIELDS,
                     device_records, styles=lambda r, f: "bold" if r["served"] else
                     ("yellow" if f.key == "templates" and r["templates"] == "stale" else ""))
                if not device_records:
                    console.print("  no verified results", style="dim")
            records += device_records
    if fmt != "table":
        emit(console, fmt, None, [Field("device", "device"), Field("key", "key"), *LIST_FIELDS,
                                  Field("repeats", "repeats"), Field("params", "params")], records)


SHOW_FIELDS = [
    Field("algorithm", "algorithm"), Field("rank", "#", numeric=True), Field("status", "status"),
    Field("ms", "ms", ms, numeric=True), Field("spread", "spread", percent, numeric=True),
    Field("rel_error", "rel. error", scientific, numeric=True), Field("measured", "times measured", numeric=True),
    Field("best", "served", lambda v: "yes" if v else ""),
    Field("params", "params", lambda p: " ".join(f"{k}={v}" for k, v in p.items()) or "(none)"),
]


def _measured_configs(measured: list[dict], algorithm: str) -> list[dict]:
    """One row per config an algorithm measured (a config re-timed several times is one row): its
    fastest successful measurement, else its last status, and how many times it was measured."""
    from autoconv.errors import AutoconvError
    from autoconv.store.sqlite import parse_params

    by_config: dict[object, dict] = {}
    for m in measured:
        if m["algorithm"] != algorithm:
            continue
        try:  # validated as every stored config is; a damaged one shows as {}
            params = parse_params(m["params"], algorithm, f"measurement {m['id']}")
        except (AutoconvError, KeyError):
            params = None
        key = params if params is not None else ("damaged", m.get("id"))
        ok = m["status"] == "ok" and m["median_ms"] is not None
        entry = by_config.setdefault(key, {"params": params, "status": m["status"], "ms": None, "spread": None,
                                           "repeats": None, "rel_error": m["rel_error"], "count": 0})
        entry["count"] += 1
        if ok and (entry["ms"] is None or m["median_ms"] < entry["ms"]):
            entry.update(status="ok", ms=m["median_ms"], spread=m.get("spread"), repeats=m.get("repeats"),
                         rel_error=m["rel_error"])
        elif entry["ms"] is None:
            entry["status"] = m["status"]
    return list(by_config.values())


@db_app.command()
@reports_errors
def show(
    layer: str = typer.Argument(..., help="MODEL/NAME or key=value pairs, as for `autoconv run`"),
    batch: Optional[int] = typer.Option(None, help="batch size (overrides n)"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    device: Optional[str] = typer.Option(None, help="only devices whose name contains this"),
    top: int = typer.Option(5, min=0, help="measured configs listed per algorithm, fastest first (0: none)"),
    json_flag: bool = JSON_OPTION,
    csv_flag: bool = CSV_OPTION,
) -> None:
    """One layer: each algorithm's best params per device, then its fastest measured configs with
    params, median, spread and status, and how many configs ended in each status."""
    from collections import Counter

    from autoconv.layers import parse_layer

    fmt = output_format(json_flag, csv_flag)
    spec = parse_layer(layer, batch).spec
    records: list[dict] = []
    with _open_existing(db) as database:
        results = [r for r in database.results() if r.spec == spec]
        found = False
        for row in _device_rows(database, device):
            measured = list(database.measurements(row["fingerprint"], spec))
            mine = [r for r in results if r.device == row["fingerprint"]]
            if not measured and not mine:
                continue
            found = True
            device_records = []
            for name in sorted({m["algorithm"] for m in measured} | {r.algorithm for r in mine}):
                best = next((r for r in mine if r.algorithm == name), None)
                configs = _measured_configs(measured, name)
                ranked = sorted(configs, key=lambda c: (c["status"] != "ok", c["ms"] if c["ms"] is not None
                                                        else float("inf")))
                for rank, config in enumerate(ranked[:top], 1):
                    served = best is not None and config["params"] == best.params and config["status"] == "ok"
                    ms_shown = best.median_ms if served and best is not None else config["ms"]
                    device_records.append({
                        "device": row["name"], "layer": str(spec), "algorithm": name, "rank": rank,
                        "status": config["status"], "ms": ms_shown, "spread": best.spread if served and best else
                        config["spread"], "repeats": config["repeats"], "rel_error": config["rel_error"],
                        "measured": config["count"], "best": served,
                        "params": config["params"].as_dict() if config["params"] is not None else {}})
                if not ranked[:top] and best is not None:  # a stored best whose measurements were pruned (shipped DBs)
                    device_records.append({
                        "device": row["name"], "layer": str(spec), "algorithm": name, "rank": 1, "status": "ok",
                        "ms": best.median_ms, "spread": best.spread, "repeats": best.repeats,
                        "rel_error": best.rel_error, "measured": 0, "best": True, "params": best.params.as_dict()})
            records += device_records
            if fmt == "table":
                console.print(Text.assemble((row["name"], "bold"), f" ({row['platform']}, driver {row['driver']})"))
                for r in sorted(mine, key=lambda r: r.median_ms):
                    default = f", default {r.default_ms:.3f} ms" if r.default_ms else ""
                    spread = f" ±{r.spread * 100:.0f}%" if r.spread is not None else ""
                    console.print(f"  {r.algorithm}: best {r.median_ms:.3f} ms{spread} ({r.gflops:.1f} GFLOP/s){default}, "
                                  f"{r.trials} trials, rel. error {r.rel_error:.1e}")
                    console.print(f"    params {r.params.describe() or '(none)'}")
                    console.print(f"    templates {r.template_hash}, autoconv {r.autoconv_version}, {r.created}",
                                  style="dim")
                for name in sorted({m["algorithm"] for m in measured}):
                    configs = _measured_configs(measured, name)
                    statuses = Counter(c["status"] for c in configs)
                    count = sum(1 for m in measured if m["algorithm"] == name)
                    console.print(f"  {name}: {len(configs)} configs measured ({count} measurements): "
                                  + ", ".join(f"{n} {s}" for s, n in statuses.most_common()))
                    faster = [r for r in device_records if r["algorithm"] == name and not r["best"]
                              and r["status"] == "ok" and r["ms"] is not None]
                    served_rows = [r for r in device_records if r["algorithm"] == name and r["best"]]
                    if served_rows and any(r["ms"] < served_rows[0]["ms"] for r in faster):
                        console.print("    a config measured faster than the stored best is not served: the best is "
                                      "re-timed on fresh data against the runners-up, and the stored time is that "
                                      "re-timing", style="dim")
                if top and device_records:
                    emit(console, fmt, f"  fastest {top} measured configs per algorithm", SHOW_FIELDS, device_records,
                         styles=lambda r, f: "bold" if r["best"] else ("red" if r["status"] != "ok" else ""))
        if not found:
            errors.print(f"{spec} has no results in {database.path}")
            raise typer.Exit(1)
    if fmt != "table":
        emit(console, fmt, None, [Field("device", "device"), Field("layer", "layer"), *SHOW_FIELDS,
                                  Field("repeats", "repeats")], records)


@db_app.command("plot")
@reports_errors
def plot_curves(
    out: Path = typer.Argument(..., help="the PNG or SVG file to write"),
    db: Optional[Path] = typer.Option(None, help=DB_HELP),
    device: Optional[str] = typer.Option(None, help="only devices whose name contains this"),
) -> None:
    """Tuning curves: the best time so far against the trial index, per layer and algorithm, from
    the measurements the tuner recorded (needs matplotlib: autoconv's [plot] extra)."""
    import math

    from autoconv.layers import layer_name
    from autoconv.plots import check_output_path, tuning_curves_figure

    check_output_path(out, option="FILE")
    curves: dict[str, list[float]] = {}
    with _open_existing(db) as database:
        rows = _device_rows(database, device)
        results = database.results()
        layers = {r.spec for r in results}
        stored: dict[str, float] = {}
        for row in rows:
            for spec in sorted(layers, key=lambda s: s.key()):
                by_algorithm: dict[str, list[float]] = {}
                for m in database.measurements(row["fingerprint"], spec):
                    value = m["median_ms"] if m["status"] == "ok" and m["median_ms"] is not None else math.inf
                    by_algorithm.setdefault(m["algorithm"], []).append(value)
                for name, times in by_algorithm.items():
                    if len(times) > 1:  # a single measurement (an untunable method) is no curve
                        label = layer_name(spec) + f" {name}" + (f" ({row['name']})" if len(rows) > 1 else "")
                        curves[label] = times
                        kept = next((r for r in results if r.device == row["fingerprint"] and r.spec == spec
                                     and r.algorithm == name), None)
                        if kept is not None:
                            stored[label] = kept.median_ms
    if not curves:
        errors.print(f"no tuning measurements in {db_path_option(db)} to plot (shipped databases keep none)")
        raise typer.Exit(1)
    tuning_curves_figure(curves, "Tuning curves: best time so far per layer and algorithm", out, stored)
    console.print(f"{len(curves)} curve(s) written to {out}", soft_wrap=True)


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
