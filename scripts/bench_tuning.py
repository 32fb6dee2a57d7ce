"""Benchmark: the generated GEMM's default config vs the Optuna-tuned config vs im2col + numpy
BLAS (OpenBLAS), on the ResNet-50 layers of ../shared/layers/public.json at batch 1, in one run.

Tunes every layer into a fresh database with a fixed trial budget, then re-measures the three
methods side by side (interleaved rounds, so drift hits them alike) and writes a markdown report.

    python scripts/bench_tuning.py [--trials 48] [--out benchmarks/tuning-pocl.md] [--ship tuning_db/pocl-cpu.db]

--ship also writes the tuned database where autoconv's shipped databases live.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import autoconv
from autoconv import Plan, get_algorithm
from autoconv.algorithms import IM2COL_BLAS
from autoconv.backends import get_backend
from autoconv.layers import model_layers
from autoconv.store import SQLiteStore
from autoconv.tuning.tuner import tune_layers
from autoconv.tuning.verify import TOLERANCE, random_operands, reference_output, relative_error

SHARED = Path(__file__).resolve().parents[2] / "shared" / "layers" / "public.json"


def public_resnet50_names() -> list[str]:
    if SHARED.exists():
        return [row["name"] for row in json.loads(SHARED.read_text())["resnet50"]]
    return [layer.name for layer in model_layers("resnet50")]


def interleaved_medians(convs: dict[str, object], operands: tuple, rounds: int, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in convs}
    for _ in range(rounds):
        for name, conv in convs.items():
            samples[name] += conv.time(*operands, warmup=1, repeats=repeats).samples_ms
    return {name: statistics.median(values) for name, values in samples.items()}


def checked_methods(backend, spec, tuned: Plan, operands: tuple, label: str, extra: dict | None = None) -> dict:
    """The tuned algorithm's default config, its tuned one and the BLAS baseline (plus `extra`)
    prepared for a layer, each checked against the float64 reference before anything is timed."""
    host = get_backend("numpy")
    default = Plan(tuned.algorithm, get_algorithm(tuned.algorithm).heuristic(spec, backend.device), "heuristic")
    convs = {
        "default": backend.prepare(spec, default),
        "tuned": backend.prepare(spec, tuned),
        "blas": (backend if IM2COL_BLAS in backend.algorithms else host).prepare(spec, Plan(IM2COL_BLAS)),
        **(extra or {}),
    }
    reference = reference_output(spec, operands)
    for name, conv in convs.items():
        error = relative_error(conv.run(*operands, poison=True), reference)
        if not error < TOLERANCE:
            raise SystemExit(f"{label}: {name} is wrong (relative error {error:.1e})")
    return convs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/tuning-pocl.md")
    parser.add_argument("--ship", default=None, help="also copy the tuned DB here (e.g. tuning_db/pocl-cpu.db)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="opencl")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = int(args.device) if args.device and args.device.isdigit() else args.device
    backend = get_backend(args.backend, device)
    info = backend.device
    wanted = set(public_resnet50_names())
    layers = [layer for layer in model_layers("resnet50", batch=1) if layer.name in wanted]

    work = Path(tempfile.mkdtemp(prefix="autoconv-bench-"))
    db_path = work / "tuning.db"
    rows = []
    with SQLiteStore(db_path) as db:
        def started(label: str, spec: object) -> None:
            print(f"tuning {label} ({args.trials} trials) ...", file=sys.stderr, flush=True)

        reports = tune_layers([(layer.label, layer.spec) for layer in layers], backend, db, trials=args.trials,
                              on_layer_start=started)
    for layer, report in zip(layers, reports):
        spec = layer.spec
        best = report.best_generated
        if best is None:
            raise SystemExit(f"{layer.label}: no verified generated config (failures: {report.failures})")
        print(f"measuring {layer.label} ...", file=sys.stderr, flush=True)
        operands = random_operands(spec, seed=1)  # not the data the tuner saw
        convs = checked_methods(backend, spec, Plan(best.algorithm, best.params, "tuned"), operands, layer.label)
        rows.append((layer, report, interleaved_medians(convs, operands, args.rounds, args.repeats)))

    blas_name = "cuBLAS" if IM2COL_BLAS in backend.algorithms else "numpy BLAS"
    lines = [
        f"# Tuning: default config vs Optuna-tuned vs im2col + {blas_name} — {info.name}",
        "",
        f"Measured {datetime.date.today().isoformat()} by `scripts/bench_tuning.py --trials {args.trials}` "
        f"(autoconv {autoconv.__version__}) on {info.platform}, driver {info.driver}, {info.compute_units} compute "
        f"units; host {platform.machine()}, {os.cpu_count()} cores. ResNet-50 layers of `shared/layers/public.json`, "
        f"batch 1, float32. Each layer was tuned with {args.trials} measured trials (TPE, the default config first); "
        f"then default, tuned and baseline were re-measured together on fresh data, in {args.rounds} interleaved rounds "
        f"of {args.repeats} runs (medians shown), each checked against the float64 reference first. Generated times "
        "are kernel events (im2col + GEMM); the baseline is wall-clock im2col + `numpy.matmul`.",
        "",
        "| layer | shape | GFLOP | default ms | tuned ms | BLAS ms | tuned vs default | tuned / BLAS speed "
        "| tuned GF/s | tuning wall s | failed configs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    speedups, ratios = [], []
    for layer, report, ms in rows:
        spec = layer.spec
        speedups.append(ms["default"] / ms["tuned"])
        ratios.append(ms["blas"] / ms["tuned"])
        lines.append(
            f"| {layer.name} | {spec} | {spec.flops / 1e9:.3f} | {ms['default']:.3f} | {ms['tuned']:.3f} | "
            f"{ms['blas']:.3f} | {speedups[-1]:.2f}x | {ratios[-1]:.2f} | {spec.flops / (ms['tuned'] * 1e6):.1f} | "
            f"{report.wall_s:.0f} | {sum(report.failures.values())} |")
    lines += [
        "",
        f"- Tuned vs default: median {statistics.median(speedups):.2f}x, range {min(speedups):.2f}x to "
        f"{max(speedups):.2f}x; at least 1.5x on {sum(s >= 1.5 for s in speedups)} of {len(speedups)} layers.",
        f"- Tuned speed relative to {blas_name} (1.0 = as fast): median {statistics.median(ratios):.2f}, range "
        f"{min(ratios):.2f} to {max(ratios):.2f}; within 2x of it (>= 0.5) on {sum(r >= 0.5 for r in ratios)} of "
        f"{len(ratios)} layers.",
        "",
        "Winning configs:",
        "",
    ]
    for layer, report, _ in rows:
        lines.append(f"- {layer.name}: {report.best_generated.algorithm} {report.best_generated.params.describe()}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.ship:
        with SQLiteStore(db_path) as db:
            db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.db.disable_wal()  # a shipped file is read-only: no -wal/-shm beside it
            db.db.execute("delete from measurements")
            db.db.conn.commit()
            db.db.vacuum()
        Path(args.ship).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.ship).with_suffix(".tmp")
        shutil.copyfile(db_path, tmp)
        os.replace(tmp, args.ship)
        print(f"shipped database written to {args.ship}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
