"""How long the plan lookup takes as the tuning database grows: 1k, 10k and 100k results.

For each size, a fresh Session (nothing cached) answers `lookup` for a tuned layer (the indexed
read of its own rows) and for an untuned one (the fallback, which reads the whole database once
and keeps it), beside the whole-table read that every lookup paid before (read_contents +
resolve) as the baseline, in the same run. Methods interleave; medians with their IQR.

    python scripts/bench_lookup.py --sizes 1000,10000,100000 --repeats 5 --out benchmarks/lookup.md
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from autoconv import ConvSpec, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.render import template_hash
from autoconv.serve.lookup import resolve
from autoconv.serve.session import Session, read_contents
from autoconv.settings import Settings
from autoconv.store import SQLiteStore, TunedResult

DEVICE = DeviceInfo("opencl", "Bench CL", "benchvendor", "Bench CPU", "1.0", "cpu", 2, 65536, 1024, (1024, 1024, 1024))


def spec_of(index: int) -> ConvSpec:
    return ConvSpec(1, 16, 14, 14, 1 + index, 3, 3, padding=1)


def build(path: Path, size: int) -> None:
    """A database of `size` results (one per layer), written in bulk by copying one real row."""
    with SQLiteStore(path) as db:
        db.record_device(DEVICE)
        db.save_result(TunedResult(device=DEVICE.fingerprint(), spec=spec_of(0), algorithm="im2col_gemm",
                                   template_hash=template_hash(), params=get_algorithm("im2col_gemm").space.validate({}),
                                   median_ms=1.0, gflops=1.0, rel_error=1e-6, default_ms=2.0, trials=5))
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    layer = dict(conn.execute("select * from layers").fetchone())
    result = dict(conn.execute("select * from results").fetchone())
    result.pop("id", None)
    layers, results = [], []
    for index in range(1, size):
        spec = spec_of(index)
        layers.append({**layer, "key": spec.key(), "k": spec.k})
        results.append({**result, "layer": spec.key(), "median_ms": 1.0 + index % 7})
    for table, rows in (("layers", layers), ("results", results)):
        if rows:
            names = list(rows[0])
            conn.executemany(f"insert into {table} ({', '.join(names)}) values ({', '.join('?' for _ in names)})",
                             [tuple(row[n] for n in names) for row in rows])
    conn.commit()
    conn.close()


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/lookup.md"))
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            path = Path(work) / f"lookup-{size}.db"
            build(path, size)
            settings = Settings(db_path=path, shipped_db_dir=None)
            tuned, untuned = spec_of(size // 2), ConvSpec(1, 16, 14, 14, 3, 5, 5, padding=2)
            methods = {
                "tuned layer (indexed)": lambda: Session(settings).lookup(tuned, DEVICE),
                "untuned layer (fallback)": lambda: Session(settings).lookup(untuned, DEVICE),
                "whole-table read (before)": lambda: resolve(tuned, DEVICE, [read_contents(path)]),
            }
            assert Session(settings).lookup(tuned, DEVICE).source == "tuned"
            samples: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.repeats):
                for name, action in methods.items():  # interleaved
                    samples[name].append(timed(action))
            for name, values in samples.items():
                q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
                rows.append((size, name, statistics.median(values), q[2] - q[0]))
            print(f"{size} results: " + ", ".join(f"{n} {statistics.median(v):.1f} ms" for n, v in samples.items()),
                  flush=True)
    baseline = {size: ms for size, name, ms, _ in rows if name.startswith("whole-table")}
    lines = ["# Plan lookup time against the tuning database's size", "",
             "`python scripts/bench_lookup.py --sizes " + args.sizes + f" --repeats {args.repeats}`: a fresh Session "
             "(nothing cached) per call, one device, one result per layer. Median of the repeats, IQR beside it; "
             "the last column is the whole-table read's time over the method's, in the same run.", "",
             "| results | lookup | median ms | IQR ms | vs whole-table read |", "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {size} | {name} | {ms:.2f} | {iqr:.2f} | {baseline[size] / ms:.1f}x |" for size, name, ms, iqr in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
