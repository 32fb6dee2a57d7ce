"""Run a whole ONNX CNN on autoconv: `autoconv.onnx.load(model)` prepares it once (checked, shapes
inferred, constants folded, Conv + BatchNormalization + Add + Relu fused as onnxruntime fuses
them) and returns a Model whose `run(output_names, input_feed)` has onnxruntime's signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoconv.graph.prepare import UnsupportedModelError, prepare
from autoconv.graph.runner import Model, StepRow


def load(model: str | Path | Any, *, device: int | str | None = None, backend: str | None = None,
         db: str | Path | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
         layout: str | None = None) -> Model:
    """A path or an onnx.ModelProto -> a Model on `backend` ("opencl" by default, "cuda" or
    "numpy") and `device`, its convolutions served from `db` (then the shipped databases).
    `input_shapes` fixes inputs with dynamic dimensions (a symbolic batch, say). `layout`
    "NCHW{b}c" keeps the tensors between convolutions channel-blocked (OpenCL; reordered to NCHW
    only where another operator reads them), "NCHW" does not; None chooses for the graph and the
    device (on PoCL, a chain of convolutions that all run blocked at the CPU's vector width in
    channels; graphs with Concat, Split or depthwise layers, and other devices, NCHW:
    autoconv.graph.runner.model_layout)."""
    return Model(prepare(model, input_shapes), device=device, backend=backend, db=None if db is None else str(db),
                 layout=layout)


__all__ = ["Model", "StepRow", "UnsupportedModelError", "load"]
