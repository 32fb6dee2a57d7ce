"""A prepared ONNX model run as a loop over its steps: each fused Conv an `autoconv.Conv2d` (resident
weights; the tensors between two conv layers stay device arrays), 2-D pooling of a device array a
generated kernel on the same device in the array's layout (autoconv/backends/pool.py), a fully
connected layer with constant weights a 1x1 convolution there (autoconv/graph/dense.py), each other
operator numpy on the host arrays (views of device memory on shared-memory devices), any operator
autoconv lacks through onnx.reference (correct, slow, and said once when the model is loaded)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from autoconv.backends.affine import DeviceAffine
from autoconv.backends.pool import DevicePool, PoolGeometry
from autoconv.graph.dense import DeviceDense, dense_weights
from autoconv.graph.ops import OPS, SPLIT, activate, affine_map, pool_geometry, split
from autoconv.errors import InvalidSpecError
from autoconv.layouts import LAYOUTS, NCHW
from autoconv.spec import ConvSpec
from autoconv.graph.prepare import ConvStep, OpStep, PreparedModel, UnsupportedModelError, reference_node
from autoconv.serve.api import to_device
from autoconv.serve.layer import Conv2d
from autoconv.serve.session import default_session, device_runtime

# Pooling that runs on the device when its input is a device array: a model's tensors stay there,
# in their layout (ResNet-50's MaxPool on PoCL, in one run: numpy on the host took 1.5 ms, 2.6 ms
# with the reorders of a blocked chain around it).
DEVICE_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")


@dataclass(frozen=True)
class StepRow:
    """One row of `Model.describe()`: a node or fused group, what runs it, and its plan."""

    name: str
    ops: str  # "Conv+BatchNormalization+Relu", "MaxPool", ...
    runs_on: str  # "autoconv layer", "numpy", "onnx.reference"
    plan: str


# Operators that read and write NCHW only and meet conv outputs in the middle of a graph: in a
# blocked chain each costs reorders around it (measured untuned on PoCL AVX-512: the Inceptions,
# DenseNet-121 and SqueezeNet, all Concat-heavy, 0.48x / 0.25x / 0.29x of onnxruntime in NCHW16c
# against 0.70x / 0.35x / 0.40x in NCHW).
NCHW_JOINS = ("Concat", "Split")


def model_layout(backend: str, device: int | str | None, prepared: PreparedModel | None = None) -> str:
    """The layout a whole model keeps between its convolutions unless told: on a CPU device whose
    arrays carry layouts (PoCL), channel-blocked at its vector width (NCHW16c on AVX-512, NCHW8c
    otherwise, as onnxruntime's NCHWc transformer chooses) where the graph is a chain of
    convolutions that all run blocked (ResNet-50 tuned for 5 minutes: 0.94x onnxruntime's speed in
    NCHW16c against 0.83x in NCHW, benchmarks/models-resnet50-layouts-pocl.md); NCHW for graphs
    that join branches with Concat or Split, or hold a convolution no algorithm runs blocked (a
    grouped layer whose groups do not fill whole blocks: each such layer costs two reorders), and on
    other devices (GPUs: not measured; CUDA arrays are NCHW)."""
    from autoconv.algorithms.blocked_direct import preferred_block
    from autoconv.serve.lookup import UnsupportedAlgorithmError, heuristic_algorithm

    if backend == "numpy":
        return NCHW
    runtime = device_runtime(default_session().backend(backend, device))
    if runtime is None or not runtime.layout_arrays or runtime.device.device_type != "cpu":
        return NCHW
    blocked = f"NCHW{preferred_block(runtime.device)}c"
    if prepared is not None:
        for step in prepared.steps:
            if isinstance(step, OpStep) and step.op_type in NCHW_JOINS:
                return NCHW
            # Where no algorithm an untuned blocked layer could be served runs a conv blocked
            # (lookup.heuristic_algorithm), that layer would run NCHW between two reorders.
            if isinstance(step, ConvStep):
                try:
                    heuristic_algorithm(_blocked_spec(step, blocked), runtime.device)
                except UnsupportedAlgorithmError:
                    return NCHW
    return blocked


def _blocked_spec(step: ConvStep, layout: str) -> ConvSpec:
    """The conv step as a layer in `layout`, on the smallest image its window fits: enough for an
    algorithm to say whether it runs the layer there (the image size does not decide that)."""
    _, _, r, s = step.weight.shape
    (dh, dw), groups = step.dilation, step.groups
    return ConvSpec.from_shapes((1, step.weight.shape[1] * groups, (r - 1) * dh + 1, (s - 1) * dw + 1),
                                step.weight.shape, stride=step.stride, dilation=step.dilation, groups=groups,
                                layout=layout)


class Model:
    """What `autoconv.onnx.load` returns. `run(output_names, input_feed)` has onnxruntime's
    `InferenceSession.run` signature; `model(x)` runs a one-input model and returns its first
    output. `layout` is the layout its tensors keep between convolutions (`model_layout`'s
    choice unless one was given)."""

    def __init__(self, prepared: PreparedModel, *, device: int | str | None = None, backend: str | None = None,
                 db: str | None = None, layout: str | None = None) -> None:
        self._prepared = prepared
        self._backend = backend or "opencl"
        self._device = device
        if layout is not None and layout not in LAYOUTS:
            raise InvalidSpecError(f"layout: expected None or one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.layout = model_layout(self._backend, device, prepared) if layout is None else layout
        self._layers: dict[int, Any] = {}
        self._prepad: dict[int, list[tuple[int, int]]] = {}
        for index, step in enumerate(prepared.steps):
            if not isinstance(step, ConvStep):
                continue
            (top, bottom), (left, right) = step.padding
            if (top, left) == (bottom, right):
                padding: tuple[int, int] = (top, left)
            else:  # asymmetric: padded on the host before a conv without padding
                self._prepad[index] = [(0, 0), (0, 0), (top, bottom), (left, right)]
                padding = (0, 0)
            self._layers[index] = Conv2d(step.weight, step.bias, step.stride, padding, step.dilation, step.groups,
                                         activation=step.activation, device=device, backend=self._backend, db=db,
                                         layout=None if self.layout == NCHW else self.layout)
        # On a CPU device (PoCL) the host's BLAS is held to one thread while the model runs: OpenBLAS's
        # idle threads spin for a while after a call (a Gemm, say) and would take the cores the
        # device's kernels run on (measured on ResNet-50: 38 ms with two BLAS threads, 29.5 with one).
        shares_the_cpu = any(layer.device.device_type == "cpu" for layer in self._layers.values()) \
            and self._backend != "numpy"
        self._runtime = device_runtime(default_session().backend(self._backend, device)) \
            if self._layers and self._backend != "numpy" else None
        self._pools: dict[int, tuple[tuple[Any, ...], DevicePool]] = {}
        self._affines: dict[int, tuple[tuple[Any, ...], DeviceAffine]] = {}
        # Fully connected layers with constant weights run on the device as 1x1 convolutions.
        self._dense: dict[int, DeviceDense] = {}
        if self._runtime is not None:
            for index, step in enumerate(prepared.steps):
                weights = dense_weights(step.op_type, step.inputs, step.attrs, prepared.constants) \
                    if isinstance(step, OpStep) else None
                if weights is not None:
                    self._dense[index] = DeviceDense(weights, device=device, backend=self._backend, db=db)
        self._blas: Any = None
        if shares_the_cpu:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        fallbacks = sorted({s.op_type for s in prepared.steps if isinstance(s, OpStep) and not s.native})
        if fallbacks:
            warnings.warn(f"autoconv has no kernel for {', '.join(fallbacks)}: these nodes run through "
                          "onnx.reference (correct, slow)", RuntimeWarning, stacklevel=3)
        self._reference: dict[int, Any] = {}
        # Each tensor is dropped after the last step that reads it (graph outputs are kept): its
        # memory goes back to the allocator for the next step's result, still warm in the caches,
        # instead of every step touching fresh memory.
        last_read: dict[str, int] = {}
        for index, step in enumerate(prepared.steps):
            reads = [step.input, *( [step.residual] if step.residual else [])] if isinstance(step, ConvStep) \
                else [name for name in step.inputs if name]
            for name in reads:
                last_read[name] = index
        keep = set(prepared.outputs) | set(prepared.constants)
        self._drop_after: dict[int, list[str]] = {}
        for name, index in last_read.items():
            if name not in keep:
                self._drop_after.setdefault(index, []).append(name)

    @property
    def inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """Each input's name and the shape it takes."""
        return list(self._prepared.inputs)

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self._prepared.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self._prepared.outputs)

    def __call__(self, x: Any) -> np.ndarray:
        if len(self._prepared.inputs) != 1:
            raise UnsupportedModelError(f"model(x) needs a one-input model; this one has inputs {self.input_names}: "
                                        "use model.run(None, {name: array, ...})")
        return self.run(None, {self.input_names[0]: x})[0]

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[np.ndarray]:
        outputs, _ = self._execute(output_names, input_feed, timed=False)
        return outputs

    def timed_run(self, input_feed: dict[str, Any]) -> tuple[list[np.ndarray], list[tuple[StepRow, float]]]:
        """All outputs, and each step's wall time in ms (device work waited for, step by step)."""
        outputs, times = self._execute(None, input_feed, timed=True)
        rows = self.describe()
        return outputs, list(zip(rows, times))

    def describe(self) -> list[StepRow]:
        rows = []
        for index, step in enumerate(self._prepared.steps):
            if isinstance(step, ConvStep):
                layer = self._layers[index]
                plans = layer.plans
                plan = "; ".join(p.describe() for p in plans.values()) if plans else "chosen at the first run"
                note = " (asymmetric padding applied on the host)" if index in self._prepad else ""
                rows.append(StepRow(step.name, "+".join(["Conv", *step.fused]), "autoconv layer", plan + note))
            else:
                native = step.native and index not in self._reference
                dense = self._dense.get(index)
                if dense is not None:
                    plans = dense.plans
                    plan = "; ".join(p.describe() for p in plans.values()) if plans else "chosen at the first run"
                    rows.append(StepRow(step.name, step.op_type, "autoconv layer (1x1 conv)", plan))
                    continue
                on_device = index in self._pools or index in self._affines
                runs_on = "device kernel" if on_device else "numpy" if native else "onnx.reference"
                rows.append(StepRow(step.name, "+".join([step.op_type, *step.fused]), runs_on, ""))
        return rows

    # -----------------------------------------------------------------------------------------
    def _check_feed(self, input_feed: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(input_feed, dict):
            raise UnsupportedModelError(f"input_feed: expected a dict of input name -> array, got {type(input_feed).__name__}")
        unknown = sorted(set(input_feed) - set(self.input_names))
        missing = [name for name in self.input_names if name not in input_feed]
        if unknown or missing:
            raise UnsupportedModelError(f"input_feed: expected inputs {self.input_names}"
                                        + (f"; missing {missing}" if missing else "")
                                        + (f"; unknown {unknown}" if unknown else ""))
        values = {}
        for name, shape in self._prepared.inputs:
            array = np.asarray(input_feed[name])
            if array.shape != shape:
                raise UnsupportedModelError(f"input_feed[{name!r}]: expected shape {shape}, got {array.shape}")
            if array.dtype != np.float32:
                raise UnsupportedModelError(f"input_feed[{name!r}]: expected float32, got {array.dtype}")
            values[name] = array
        return values

    def _execute(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
                 timed: bool) -> tuple[list[np.ndarray], list[float]]:
        if self._blas is None:
            return self._steps(output_names, input_feed, timed)
        with self._blas.limit(limits=1, user_api="blas"):
            return self._steps(output_names, input_feed, timed)

    def _steps(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
               timed: bool) -> tuple[list[np.ndarray], list[float]]:
        wanted = list(self.output_names if output_names is None else output_names)
        unknown = [name for name in wanted if name not in self.output_names]
        if unknown:
            raise UnsupportedModelError(f"output_names: {unknown} are not outputs of the model {self.output_names}")
        env: dict[str, Any] = dict(self._prepared.constants)
        env.update(self._check_feed(input_feed))
        times: list[float] = []
        for index, step in enumerate(self._prepared.steps):
            start = time.perf_counter()
            if isinstance(step, ConvStep):
                result = self._conv(index, step, env)
                env[step.output] = result
                if timed and hasattr(result, "wait"):
                    result.wait()
            else:
                inputs = [env[name] if name else None for name in step.inputs]
                results = self._on_device(index, step, inputs)
                if results is None and index not in self._reference:
                    results = self._native(index, step, inputs)
                if results is None:
                    results = self._by_reference(index, step, inputs)
                for name, value in zip(step.outputs, results):
                    if name:
                        env[name] = value
                if timed:
                    for value in results:
                        if hasattr(value, "wait"):
                            value.wait()
            for name in self._drop_after.get(index, ()):
                env.pop(name, None)
            if timed:
                times.append((time.perf_counter() - start) * 1e3)
        return [np.asarray(env[name]) for name in wanted], times

    def _conv(self, index: int, step: ConvStep, env: dict[str, Any]) -> Any:
        x = env[step.input]
        residual = env[step.residual] if step.residual else None
        if index in self._prepad:
            x = np.pad(np.asarray(x), self._prepad[index])
        if self._backend != "numpy":
            # Tensors between conv layers stay on the device; numpy results go there once.
            if isinstance(x, np.ndarray):
                x = to_device(x, backend=self._backend, device=self._device)
            if isinstance(residual, np.ndarray):
                residual = to_device(residual, backend=self._backend, device=self._device)
        return self._layers[index](x, residual=residual)

    def _on_device(self, index: int, step: OpStep, inputs: list[Any]) -> list[Any] | None:
        """A 2-D pooling, or a BatchNormalization of constant statistics with what was folded into it
        (a per-channel affine map), of a device array of the layers' device, run there in the
        array's layout (of a float32 host array too, which goes to the device first), or a dense
        layer with constant weights (DeviceDense); None for anything else (numpy runs it then)."""
        dense = self._dense.get(index)
        if dense is not None and inputs:
            result = dense(inputs[0])
            if result is not None:
                return [result]
        runtime = self._runtime
        if runtime is None or not inputs or len(step.outputs) != 1 or \
                not (step.op_type in DEVICE_POOLS or (step.op_type == "BatchNormalization" and step.affine is not None)):
            return None
        x = _on_the_device(inputs[0], runtime, step.name)
        if x is None:
            return None
        shape = tuple(x.shape)
        layout = getattr(x, "layout", NCHW)
        key = (shape, layout)
        if step.affine is not None:  # a BatchNormalization with what was folded into it
            affine = self._affines.get(index)
            if affine is None or affine[0] != key:
                self._affines[index] = affine = (key, DeviceAffine(runtime, (shape[0], shape[1], shape[2], shape[3]),
                                                                   layout, *step.affine, step.activation or "none"))
            return [affine[1](x)]
        cached = self._pools.get(index)
        if cached is None or cached[0] != key:
            geometry = _device_pool_geometry(step.op_type, shape, step.attrs)
            if geometry is None:
                return None
            self._pools[index] = cached = (key, DevicePool(runtime, (shape[0], shape[1], shape[2], shape[3]), layout,
                                                           geometry))
        return [cached[1](x)]

    def _native(self, index: int, step: OpStep, inputs: list[Any]) -> list[np.ndarray] | None:
        """The numpy operator's outputs; None where there is none, or where it lacks an attribute's
        variant (dilated pooling, say): that node runs by reference from then on, said once."""
        if not step.native:
            return None
        host = [None if value is None else np.asarray(value) for value in inputs]
        try:
            if step.op_type == SPLIT:
                return split(host, step.attrs, self._prepared.opset, len(step.outputs))
            if step.affine is not None and host[0] is not None:  # a BatchNormalization with what was folded in
                return [activate(affine_map(host[0], *step.affine), step.activation)]
            return OPS[step.op_type](host, step.attrs, self._prepared.opset)
        except NotImplementedError as exc:
            warnings.warn(f"{step.name}: {step.op_type} with {exc} runs through onnx.reference (correct, slow)",
                          RuntimeWarning, stacklevel=4)
            return None

    def _by_reference(self, index: int, step: OpStep, inputs: list[Any]) -> list[np.ndarray]:
        import onnx

        evaluator = self._reference.get(index)
        if evaluator is None:
            evaluator = self._reference[index] = reference_node(onnx, step.node, self._prepared.opset_imports)
        feed = {name: np.asarray(value) for name, value in zip(step.inputs, inputs) if name}
        if step.affine is not None:  # onnx.reference runs the BatchNormalization node alone
            return [activate(affine_map(feed[step.inputs[0]], *step.affine), step.activation)]
        return [np.asarray(v) for v in evaluator(feed)]


def _on_the_device(x: Any, runtime: Any, name: str) -> Any | None:
    """A 4-D device array of the runtime's device, or a float32 4-D host array put there (no copy
    where the device shares host memory: a Concat's result, say, pooled or normalized there, stays
    there for the convolutions after it; GoogLeNet's pooling of its modules' outputs in numpy took a
    quarter of its time on PoCL); None for anything else."""
    if len(tuple(getattr(x, "shape", ()))) != 4:
        return None
    if runtime.device_buffer(x, name) is not None:
        return x
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32):
        return None
    return runtime.adopt(x if x.flags.writeable else x.copy())


def _device_pool_geometry(op_type: str, shape: tuple[int, ...], attrs: dict[str, Any]) -> PoolGeometry | None:
    """The node's pooling as a PoolGeometry (the ONNX attributes resolved as ops.py resolves them);
    None where the device kernel lacks the variant (dilated pooling)."""
    if op_type == "GlobalAveragePool":
        return PoolGeometry("average", (shape[2], shape[3]), (1, 1), ((0, 0), (0, 0)))
    try:
        kernel, strides, pads, explicit = pool_geometry(np.empty((0, 0, *shape[2:])), attrs)
    except NotImplementedError:
        return None
    if len(kernel) != 2:
        return None
    counted = explicit if op_type == "AveragePool" and int(attrs.get("count_include_pad", 0)) else [(0, 0), (0, 0)]
    return PoolGeometry("max" if op_type == "MaxPool" else "average", (kernel[0], kernel[1]), (strides[0], strides[1]),
                        ((pads[0][0], pads[0][1]), (pads[1][0], pads[1][1])),
                        ((counted[0][0], counted[0][1]), (counted[1][0], counted[1][1])))
