"""The pictures behind `autoconv compare --plot`, `autoconv db plot` and `autoconv explain --html`:
time per method per layer, the roofline (why im2col beats direct loops, and what it costs), and
tuning curves. matplotlib is an optional extra (`pip install matplotlib`: autoconv's [plot] extra); a figure goes to
PNG or SVG by the file's suffix and is written whole (a temporary file renamed into place)."""

from __future__ import annotations

import io
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from autoconv.errors import AutoconvError
from autoconv.roofline import DeviceRoofs
from autoconv.settings import current_umask

FIGURE_DPI = 100
COMPARE_SIZE_IN = (14.0, 6.0)  # 1400 x 600 pixels
CURVES_SIZE_IN = (10.0, 6.0)  # 1000 x 600 pixels
SUFFIXES = (".png", ".svg")


class PlotError(AutoconvError):
    """A plot cannot be made: matplotlib missing, or an unusable file name."""


@dataclass(frozen=True)
class MethodPoint:
    """One method measured on one layer."""

    layer: str
    method: str
    ms: float
    gflops: float
    intensity: float  # FLOP per byte moved


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        # Device, layer and ONNX names are text: a "$\\frac{" in one is not TeX to typeset.
        matplotlib.rcParams["text.parse_math"] = False
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install matplotlib (autoconv's [plot] extra)") from None
    return plt


def check_output_path(path: Path, suffixes: tuple[str, ...] = SUFFIXES, option: str = "--plot") -> Path:
    """A file name with one of `suffixes` whose directory exists, and matplotlib installed:
    checked before any measuring starts."""
    if path.suffix.lower() not in suffixes:
        raise PlotError(f"{option}: {path} must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise PlotError(f"{option}: the directory {path.parent} does not exist")
    if path.is_dir():
        raise PlotError(f"{option}: {path} is a directory")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PlotError(f"{option}: the directory {path.parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise PlotError(f"{option}: {path} exists and is not writable")
    _pyplot()
    return path


def _new_file_mode(path: Path) -> int:
    """The mode a replaced file keeps, else what the umask gives a new file (as open() would)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def write_atomically(path: Path, data: bytes) -> None:
    """The whole file or nothing: written beside its target, then renamed into place."""
    try:
        mode = _new_file_mode(path)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                os.fchmod(stream.fileno(), mode)  # mkstemp makes 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror or exc}") from None


def _save(figure: Any, path: Path | None) -> bytes:
    """The figure as PNG bytes (no path), or written to `path` as PNG or SVG by its suffix."""
    plt = _pyplot()
    try:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png" if path is None else path.suffix.lower().lstrip("."), dpi=FIGURE_DPI)
    finally:
        plt.close(figure)
    if path is None:
        return buffer.getvalue()
    write_atomically(path, buffer.getvalue())
    return b""


def _plain_ticks(*axes: Any) -> None:
    """Log axes labelled with plain numbers (60, 0.5), not 6x10^1: text, since TeX is off."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in axes:
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())


def compare_figure(points: Sequence[MethodPoint], roofs: DeviceRoofs | None, device: str,
                   path: Path | None = None) -> bytes:
    """Left: ms per method for each layer (log scale). Right: the roofline with every (layer,
    method) at its arithmetic intensity and measured GFLOP/s."""
    plt = _pyplot()
    layers = list(dict.fromkeys(p.layer for p in points))
    methods = list(dict.fromkeys(p.method for p in points))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = "osD^v<>pP*X"
    figure, (bars, roof) = plt.subplots(1, 2, figsize=COMPARE_SIZE_IN, dpi=FIGURE_DPI)
    width = 0.8 / max(1, len(methods))
    by_key = {(p.layer, p.method): p for p in points}
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, layer in enumerate(layers) if (layer, method) in by_key]
        ys = [by_key[(layer, method)].ms for layer in layers if (layer, method) in by_key]
        bars.bar(xs, ys, width, label=method, color=colours[method])
    bars.set_yscale("log")
    fastest = min((p.ms for p in points if p.ms > 0), default=1.0)
    bars.set_ylim(bottom=fastest / 4)  # the fastest bar stands clear of the floor
    _plain_ticks(bars.yaxis)
    bars.set_xticks(range(len(layers)))
    bars.set_xticklabels(layers, rotation=30 if len(layers) > 3 else 0, ha="right" if len(layers) > 3 else "center",
                         fontsize=8)
    bars.set_ylabel("time per call (ms, log scale; lower is better)")
    bars.set_title("Time per layer and method")
    bars.legend(fontsize=8)
    bars.grid(axis="y", which="both", alpha=0.3)

    for j, method in enumerate(methods):
        mine = [p for p in points if p.method == method]
        roof.scatter([p.intensity for p in mine], [p.gflops for p in mine], label=method, color=colours[method],
                     marker=markers[j % len(markers)], s=40, zorder=3)
    intensities = [p.intensity for p in points] or [1.0]
    low, high = min(intensities) / 2, max(intensities) * 2
    if roofs is not None:
        low, high = min(low, roofs.ridge / 4), max(high, roofs.ridge * 4)
        xs = [low * (high / low) ** (i / 200) for i in range(201)]
        roof.plot(xs, [roofs.bound(x) for x in xs], color="black", linewidth=1.5,
                  label=f"roof: {roofs.bandwidth_gbs:.0f} GB/s copy, {roofs.peak_gflops:.0f} GFLOP/s GEMM")
    roof.set_xscale("log")
    roof.set_yscale("log")
    _plain_ticks(roof.xaxis, roof.yaxis)
    roof.set_xlim(low, high)
    if roofs is not None and any(p.gflops > roofs.bound(p.intensity) for p in points):
        roof.plot([], [], " ", label="above the roof: FLOPs counted as direct convolution (Winograd does fewer)")
    roof.set_xlabel("arithmetic intensity (FLOP per byte moved, modelled)")
    roof.set_ylabel("GFLOP/s (direct-convolution FLOPs)")
    roof.set_title("Roofline: direct loops re-read memory, im2col pays its buffer once")
    roof.legend(fontsize=8, loc="lower right")
    roof.grid(which="both", alpha=0.3)
    figure.suptitle(device, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def tuning_curves_figure(curves: dict[str, list[float]], title: str, path: Path | None = None,
                         stored: dict[str, float] | None = None) -> bytes:
    """Best time so far against the trial index, one line per (layer, algorithm); `stored` (same
    labels) marks the time the database serves, re-timed on fresh data, at each curve's end."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=CURVES_SIZE_IN, dpi=FIGURE_DPI)
    marked = False
    for label, times in curves.items():
        trials, best, running = [], [], math.inf
        for index, value in enumerate(times, 1):
            running = min(running, value)
            if math.isfinite(running):  # before the first verified config there is nothing to draw
                trials.append(index)
                best.append(running)
        line, = axes.step(trials, best, where="post", label=label)
        if stored and label in stored and trials:
            axes.plot([trials[-1]], [stored[label]], marker="o", markerfacecolor="none", color=line.get_color())
            marked = True
    axes.set_xlabel("trial (measured config, in order)")
    axes.set_ylabel("best time so far (ms, log scale)")
    axes.set_yscale("log")
    _plain_ticks(axes.yaxis)
    axes.set_title(title)
    axes.grid(which="both", alpha=0.3)
    if marked:
        axes.plot([], [], "o", markerfacecolor="none", color="grey", label="stored: the served time, re-timed on fresh data")
    if curves:
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return _save(figure, path)


def model_steps_figure(steps: Sequence[tuple[str, float, str]], title: str, path: Path | None = None) -> bytes:
    """One horizontal bar per step of a model run (label, ms, what ran it), coloured by what ran it."""
    plt = _pyplot()
    height = max(3.0, 0.16 * len(steps) + 1.0)
    figure, axes = plt.subplots(figsize=(8.0, height), dpi=FIGURE_DPI)
    kinds = sorted({kind for _, _, kind in steps})
    colours = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    positions = range(len(steps))
    axes.barh(list(positions), [ms for _, ms, _ in steps], color=[colours[kind] for _, _, kind in steps])
    axes.set_yticks(list(positions), [label for label, _, _ in steps], fontsize=5)
    axes.invert_yaxis()
    axes.set_xlabel("ms (one timed run)")
    axes.set_title(title)
    for kind in kinds:
        axes.barh([], [], color=colours[kind], label=kind)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
