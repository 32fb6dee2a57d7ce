"""Benchmark on a CUDA GPU: per ResNet-50 layer (../shared/layers/public.json) and batch size,
generated im2col+GEMM (default and tuned) vs im2col + cuBLAS vs torch.nn.functional.conv2d (cuDNN,
fp32, TF32 off) where torch is there, all in one run; plus the tuned GEMM kernel alone vs cuBLAS
SGEMM (CuPy matmul) on the same im2col matrix. Writes benchmarks/cuda-<gpu>.md.

    python scripts/bench_cuda.py [--batches 1,32] [--trials 40] [--out benchmarks/cuda-h100.md]

`--backend opencl --trials 2 --layers res5_3x3 --batches 1` runs the same code path on PoCL (a
smoke test for machines without a GPU; the cuBLAS-only columns are then left out).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tuning import checked_methods, interleaved_medians, public_resnet50_names  # noqa: E402

import autoconv  # noqa: E402
from autoconv.backends import get_backend  # noqa: E402
from autoconv import Plan  # noqa: E402
from autoconv.layers import model_layers  # noqa: E402
from autoconv.store import SQLiteStore  # noqa: E402
from autoconv.tuning.tuner import tune_layers  # noqa: E402
from autoconv.tuning.verify import random_operands  # noqa: E402


class TorchConv:
    """torch.nn.functional.conv2d (cuDNN, fp32, TF32 off) behind the PreparedConv timing calls."""

    def __init__(self, spec: autoconv.ConvSpec) -> None:
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        self.torch, self.spec = torch, spec

    def _call(self, x, w, b):
        s = self.spec
        return self.torch.nn.functional.conv2d(x, w, b, s.stride, s.padding, s.dilation, s.groups)

    def run(self, x, w, b=None, *, poison=False):
        t = self.torch
        args = [t.from_numpy(a).cuda() if a is not None else None for a in (x, w, b)]
        return self._call(*args).cpu().numpy()

    def time(self, x, w, b=None, *, warmup=2, repeats=10, rotate=3):
        from autoconv.backends.base import Timing

        t = self.torch
        copies = [[t.from_numpy(a).cuda() if a is not None else None for a in (x, w, b)] for _ in range(rotate)]
        for i in range(warmup):
            self._call(*copies[i % rotate])
        start, end, samples = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True), []
        for i in range(repeats):
            start.record()
            self._call(*copies[i % rotate])
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return Timing(tuple(samples))


def gemm_only_vs_sgemm(conv, operands, repeats: int = 20) -> tuple[float, float] | None:
    """Median ms of the tuned GEMM kernel alone and of cuBLAS SGEMM (cupy.matmul) on the same
    im2col matrix the kernel reads (im2col_gemm plans only)."""
    if conv.plan.algorithm != "im2col_gemm":
        return None
    from autoconv.backends.cuda import launch_geometry

    cp = conv.runtime._cupy
    spec = conv.spec
    conv.run(*operands)  # fills the im2col matrix
    kernel, source = conv._kernels[1], conv.sources[1]
    grid, block = launch_geometry(source)
    args = conv._args(source, conv.buffers)
    g = spec.groups
    cols = conv.buffers["scratch"]
    ldn = cols.size // (g * spec.gemm_k)
    a = conv.buffers["weight"][: spec.k * spec.gemm_k].reshape(g, spec.gemm_m, spec.gemm_k)
    b = cols[: g * spec.gemm_k * ldn].reshape(g, spec.gemm_k, ldn)[:, :, : spec.gemm_n]
    b = cp.ascontiguousarray(b)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start, end, samples = cp.cuda.Event(), cp.cuda.Event(), []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(cp.cuda.get_elapsed_time(start, end))
        return statistics.median(samples)

    return timed(lambda: kernel(grid, block, args)), timed(lambda: cp.matmul(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--layers", default=None, help="comma-separated ResNet-50 layer names (default: public.json's)")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    backend = get_backend(args.backend)
    info = backend.device
    names = args.layers.split(",") if args.layers else public_resnet50_names()
    try:
        import torch

        have_torch = args.backend == "cuda" and torch.cuda.is_available()
    except ImportError:
        have_torch = False
    rows = []
    with SQLiteStore(Path(tempfile.mkdtemp(prefix="autoconv-cuda-")) / "tuning.db") as db:
        for batch in (int(b) for b in args.batches.split(",")):
            layers = [layer for layer in model_layers("resnet50", batch) if layer.name in names]
            reports = tune_layers([(f"{layer.name} n={batch}", layer.spec) for layer in layers], backend, db,
                                  trials=args.trials,
                                  on_layer_start=lambda label, spec: print(f"tuning {label} ...", file=sys.stderr, flush=True))
            for layer, report in zip(layers, reports):
                spec, best = layer.spec, report.best_generated
                if best is None:
                    raise SystemExit(f"{layer.name}: no verified generated config ({report.failures})")
                operands = random_operands(spec, seed=1)
                convs = checked_methods(backend, spec, Plan(best.algorithm, best.params, "tuned"), operands,
                                        f"{layer.name} n={batch}",
                                        {"torch": TorchConv(spec)} if have_torch else None)
                ms = interleaved_medians(convs, operands, args.rounds, args.repeats)
                gemm = gemm_only_vs_sgemm(convs["tuned"], operands) if args.backend == "cuda" else None
                rows.append((layer, batch, report, ms, gemm))

    lines = [
        f"# CUDA: generated im2col+GEMM (default, tuned) vs im2col + cuBLAS vs cuDNN — {info.name}",
        "",
        f"Measured {datetime.date.today().isoformat()} by `scripts/bench_cuda.py --trials {args.trials}` (autoconv "
        f"{autoconv.__version__}) on {info.name}, {info.platform}, driver {info.driver}. ResNet-50 layers of "
        "`shared/layers/public.json`, float32. Each layer was tuned with the trial budget above, then every method was "
        f"checked against the float64 reference and timed together in {args.rounds} interleaved rounds of "
        f"{args.repeats} runs (CUDA events, medians). cuDNN is `torch.nn.functional.conv2d` with TF32 off. The last "
        "columns compare the tuned GEMM kernel alone with cuBLAS SGEMM (`cupy.matmul`) on the same im2col matrix.",
        "",
        "| layer | batch | default ms | tuned ms | im2col+cuBLAS ms | cuDNN ms | tuned vs default | tuned / cuBLAS path "
        "| tuned / cuDNN | GEMM ms | SGEMM ms | GEMM / SGEMM speed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for layer, batch, report, ms, gemm in rows:
        torch_ms, tuned_ms = ms.get("torch"), ms["tuned"]
        sgemm_ratio = gemm[1] / gemm[0] if gemm else None
        if sgemm_ratio is not None:
            ratios.append(sgemm_ratio)
        lines.append(
            f"| {layer.name} | {batch} | {ms['default']:.3f} | {ms['tuned']:.3f} | {ms['blas']:.3f} | "
            f"{f'{torch_ms:.3f}' if torch_ms else '-'} | {ms['default'] / ms['tuned']:.2f}x | {ms['blas'] / ms['tuned']:.2f} | "
            f"{f'{torch_ms / tuned_ms:.2f}' if torch_ms else '-'} | "
            f"{f'{gemm[0]:.3f}' if gemm else '-'} | {f'{gemm[1]:.3f}' if gemm else '-'} | "
            f"{f'{sgemm_ratio:.2f}' if sgemm_ratio else '-'} |")
    if ratios:
        lines += ["", f"- Tuned GEMM speed relative to cuBLAS SGEMM: median {statistics.median(ratios):.2f}, range "
                      f"{min(ratios):.2f} to {max(ratios):.2f}; at least 0.8 on {sum(r >= 0.8 for r in ratios)} of {len(ratios)}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
