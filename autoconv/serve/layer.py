"""autoconv.Conv2d: a convolution layer built from existing weights, as torch.nn.Conv2d holds
them. It chooses its plan once per input shape, keeps the weights on the device (transformed
once where the plan does, e.g. Winograd's filter transform), fuses its activation and an optional
residual into the kernels' epilogue, and reads and returns device arrays, so layers chained on
one device never copy to the host between them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from autoconv.algorithms import get_algorithm
from autoconv.backends.base import Backend, PreparedConv
from autoconv.backends.reorder import relayout
from autoconv.errors import InvalidSpecError
from autoconv.layouts import LAYOUTS, NCHW
from autoconv.serve.lookup import UnsupportedAlgorithmError, fills_blocks
from autoconv.plan import Plan
from autoconv.serve.api import resolve_padding
from autoconv.serve.runner import Runner, batched_shape
from autoconv.serve.session import Session, default_session, device_runtime
from autoconv.spec import ACTIVATIONS, ConvSpec, IntOrPair, as_pair
from autoconv.tensors import as_float_array

MAX_SHAPES = 16  # input shapes a layer keeps prepared (each holds device buffers)


class Conv2d:
    """A 2-D convolution layer with its own weights: `layer(x, residual=None)`.

    `weight` (k, c/groups, r, s) and `bias` (k,) are copied when the layer is made (float32): the
    layer never reads the caller's arrays again, so changing them does nothing until
    `set_weights` is called with them. stride, padding (ints, pairs, "same", "valid"), dilation
    and groups are torch's. `activation` (None, "relu" or "relu6") and the residual run inside the
    kernels' epilogue: `layer(x, residual=r)` is relu(conv(x) + bias + r) for
    activation="relu", a ResNet block's tail. device, backend ("opencl", the default, "cuda" or
    "numpy", or a Backend object made by autoconv.backends.create_backend), db and algorithm are
    conv2d's.

    x is a host array (n, c, h, w) or (c, h, w), or a device array of the layer's device
    (autoconv.DeviceArray on OpenCL; a CuPy array, or anything with DLPack or
    __cuda_array_interface__ such as a PyTorch CUDA tensor, on CUDA): the result is then a device
    array too, and the kernels of the next layer run after these on the same device without a
    trip to the host. Layers may be called from several threads at once.

    `layout` is the layout of the layer's result: None (the default) keeps the input's (an
    autoconv.DeviceArray's `.layout`; NCHW for host arrays), or "NCHW" or a channel-blocked
    "NCHW{b}c" (b in 4, 8, 16; OpenCL). A layer computes in its result's layout where an algorithm
    runs the layer in it (the register-blocked direct convolution), so a chain of blocked layers
    never reorders between layers; an input or residual in another layout is reordered on the
    device first, and a layer that no algorithm runs blocked (depthwise, say), or whose input has at
    most half a block of channels (a first layer's 3 colour channels), computes in NCHW between
    two reorders. A blocked result is a DeviceArray, also for a host input;
    numpy.asarray gives it as NCHW.
    """

    def __init__(self, weight: Any, bias: Any | None = None, stride: IntOrPair = 1, padding: Any = 0,
                 dilation: IntOrPair = 1, groups: int = 1, *, activation: str | None = None,
                 device: int | str | None = None, backend: str | Backend | None = None, db: str | Path | None = None,
                 algorithm: str | None = None, layout: str | None = None, session: Session | None = None) -> None:
        kept_weight = _kept(as_float_array(weight, "weight"))
        if kept_weight.ndim != 4:
            raise InvalidSpecError(f"weight: expected a 4-D (k, c/groups, r, s) array, got shape {kept_weight.shape}")
        kept_bias = None if bias is None else _kept(as_float_array(bias, "bias"))
        if kept_bias is not None and kept_bias.shape != (kept_weight.shape[0],):
            raise InvalidSpecError(f"bias: expected shape ({kept_weight.shape[0]},), got {kept_bias.shape}")
        if activation not in (None, *ACTIVATIONS[1:]):
            raise InvalidSpecError(f"activation: expected None, 'relu' or 'relu6', got {activation!r}")
        if algorithm is not None:
            get_algorithm(algorithm)  # a precise error for an unknown name
        if layout is not None and layout not in LAYOUTS:
            raise InvalidSpecError(f"layout: expected None or one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.stride, self.dilation = as_pair(stride, "stride"), as_pair(dilation, "dilation")
        self._padding = resolve_padding(padding, self.stride, self.dilation, kept_weight.shape)
        self.padding = padding
        self.groups = groups
        self.activation = activation
        self._weight, self._bias = kept_weight, kept_bias
        # Every argument is checked now, on the smallest image the kernel fits, not at the first call.
        self._spec_for((1, kept_weight.shape[1] * _positive(groups), *_smallest_input(kept_weight.shape, self.dilation)),
                       False)
        self._session = session or default_session()
        if backend is None or isinstance(backend, str):
            self._backend = self._session.backend(backend or "opencl", device)
        elif isinstance(backend, Backend) and device is None:
            self._backend = backend
        else:
            raise InvalidSpecError(f"backend: expected 'opencl', 'cuda', 'numpy' or a Backend (with device=None), "
                                   f"got {backend!r}")
        self._runtime = device_runtime(self._backend)
        if layout not in (None, NCHW) and (self._runtime is None or not self._runtime.layout_arrays):
            raise InvalidSpecError(f"layout: {layout} needs a backend whose device arrays carry a layout (opencl), "
                                   f"not {self._backend.name}")
        self._db, self._algorithm = db, algorithm
        self._runners: dict[tuple[tuple[int, ...], bool, str], Runner] = {}
        self._lock = threading.Lock()

    # What the layer holds -----------------------------------------------------------------------

    @property
    def weight(self) -> np.ndarray:
        """The layer's own copy of the weights (read-only)."""
        return self._weight

    @property
    def bias(self) -> np.ndarray | None:
        return self._bias

    @property
    def device(self) -> Any:
        """The DeviceInfo of the device the layer computes on."""
        return self._backend.device

    def set_weights(self, weight: Any, bias: Any | None = None) -> None:
        """Replace the weights and bias (copied, same shapes as before); every prepared input shape
        uploads them (and transforms them) now."""
        kept_weight = _kept(as_float_array(weight, "weight"))
        if kept_weight.shape != self._weight.shape:
            raise InvalidSpecError(f"weight: expected shape {self._weight.shape}, got {kept_weight.shape}")
        kept_bias = None if bias is None else _kept(as_float_array(bias, "bias"))
        if (kept_bias is None) != (self._bias is None) or (
                kept_bias is not None and self._bias is not None and kept_bias.shape != self._bias.shape):
            expected = "no bias" if self._bias is None else f"a bias of shape {self._bias.shape}"
            raise InvalidSpecError(f"bias: the layer was made with {expected}")
        with self._lock:
            self._weight, self._bias = kept_weight, kept_bias
            for runner in self._runners.values():
                runner.conv.load_weights(kept_weight, kept_bias)

    def prepare(self, input_shape: tuple[int, ...], residual: bool = False, layout: str = NCHW) -> Plan:
        """Choose the plan for an input shape (and the result's layout, when the layer's is None),
        compile its kernels and upload the weights now (the first call with that shape does it
        otherwise); returns the plan."""
        return self._runner(tuple(int(v) for v in input_shape), residual, self.layout or layout).plan

    def prepared(self, input_shape: tuple[int, ...], residual: bool = False, layout: str = NCHW) -> PreparedConv:
        """The prepared conv serving an input shape (prepared now if it was not): for inspection
        and benchmarks (a device conv's `last_events` are its latest call's kernels)."""
        return self._runner(tuple(int(v) for v in input_shape), residual, self.layout or layout).conv

    def computes_in(self, input_shape: tuple[int, ...], residual: bool = False, layout: str = NCHW) -> str:
        """The layout the layer computes in for a result in `layout` (NCHW where no algorithm runs
        the layer blocked)."""
        return self._runner(tuple(int(v) for v in input_shape), residual, self.layout or layout).spec.layout

    @property
    def plans(self) -> dict[tuple[tuple[int, ...], bool, str], Plan]:
        """The plan chosen for each prepared (input shape, with a residual, result layout)."""
        return {key: runner.plan for key, runner in list(self._runners.items())}

    # Calls --------------------------------------------------------------------------------------

    def __call__(self, x: Any, residual: Any = None) -> Any:
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        given = NCHW if type(x) is np.ndarray else getattr(x, "layout", NCHW)
        layout = self.layout or given
        key = (shape, residual is not None, layout)
        runner = self._runners.get(key)
        if runner is None:
            if len(shape) == 4 and shape[0] == 0:
                return self._empty(x, shape, residual is not None)
            runner = self._runner(shape, residual is not None, layout)
        if layout == NCHW and given == NCHW and runner.spec.layout == NCHW:
            out = runner(x, residual)
            return out.reshape(out.shape[1:]) if len(shape) == 3 else out
        return self._call_in_layout(runner, x, residual, layout)

    def _call_in_layout(self, runner: Runner, x: Any, residual: Any, layout: str) -> Any:
        """A call where a layout is not NCHW: the input and residual reordered (on the device) to the
        layout the layer computes in, and the result to `layout`."""
        runtime = self._runtime
        assert runtime is not None  # blocked layouts come only from (and to) layout-array runtimes
        if len(tuple(x.shape)) != 4:
            raise InvalidSpecError(f"input: a layer with a {layout} result takes a 4-D (n, c, h, w) input, "
                                   f"got shape {tuple(x.shape)}")
        computes = runner.spec.layout
        if getattr(x, "layout", NCHW) != computes or (computes != NCHW and type(x) is np.ndarray):
            x = relayout(runtime, x, computes)
        if residual is not None and (getattr(residual, "layout", NCHW) != computes
                                     or (computes != NCHW and type(residual) is np.ndarray)):
            residual = relayout(runtime, residual, computes)
        out = runner(x, residual)
        return out if getattr(out, "layout", NCHW) == layout else relayout(runtime, out, layout)

    def _empty(self, x: Any, shape: tuple[int, ...], residual: bool) -> Any:
        """An empty batch gives an empty result, as torch's: the layer checked as for one image."""
        spec = self._spec_for((1, *shape[1:]), residual)
        out = np.zeros((0, spec.k, spec.p, spec.q), dtype=np.float32)
        if self._runtime is not None and self._runtime.device_buffer(x, "input") is not None:
            return self._runtime.adopt(out)
        return out

    def _runner(self, shape: tuple[int, ...], residual: bool, layout: str = NCHW) -> Runner:
        key = (shape, residual, layout)
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None:
                return runner
            if layout != NCHW and (self._runtime is None or not self._runtime.layout_arrays):
                raise InvalidSpecError(f"layout: {layout} needs a backend whose device arrays carry a layout (opencl)")
            spec = self._spec_for(shape, residual, layout)
            if not fills_blocks(spec):  # a first layer's few channels: NCHW, its result reordered
                spec = spec.replace(layout=NCHW)
            try:
                plan = self._session.choose_plan(spec, self._backend, self._db, algorithm=self._algorithm)
            except UnsupportedAlgorithmError:
                if layout == NCHW:
                    raise
                spec = spec.replace(layout=NCHW)  # nothing runs it blocked: NCHW between two reorders
                plan = self._session.choose_plan(spec, self._backend, self._db, algorithm=self._algorithm)
            target = self._session.backend_for(plan, self._backend)
            conv = target.prepare(spec, plan)
            conv.load_weights(self._weight, self._bias)
            runner = Runner(spec, plan, conv, self._runtime, on_device=target is self._backend)
            if len(self._runners) >= MAX_SHAPES:
                self._runners.pop(next(iter(self._runners)))
            self._runners[key] = runner
            return runner

    def _spec_for(self, shape: tuple[int, ...], residual: bool, layout: str = NCHW) -> ConvSpec:
        begin, end = self._padding
        return ConvSpec.from_shapes(batched_shape(shape), self._weight.shape, stride=self.stride, padding=begin,
                                    dilation=self.dilation, groups=self.groups, bias=self._bias is not None,
                                    padding_end=end, activation=self.activation, residual=residual, layout=layout)

    def __repr__(self) -> str:
        k, cg, r, s = self._weight.shape
        extras = [f"stride={self.stride}", f"padding={self.padding!r}"]
        if self.dilation != (1, 1):
            extras.append(f"dilation={self.dilation}")
        if self.groups != 1:
            extras.append(f"groups={self.groups}")
        if self.activation:
            extras.append(f"activation={self.activation!r}")
        if self.layout:
            extras.append(f"layout={self.layout!r}")
        return (f"Conv2d({cg * _positive(self.groups)} -> {k}, {r}x{s}, {', '.join(extras)}, "
                f"bias={self._bias is not None}, on {self.device.name!r})")


def _kept(array: np.ndarray) -> np.ndarray:
    """The layer's own read-only float32 copy of an array."""
    kept = np.array(array, dtype=np.float32, order="C", copy=True)
    kept.flags.writeable = False
    return kept


def _positive(groups: Any) -> int:
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)) or groups <= 0:
        raise InvalidSpecError(f"groups: expected a positive int, got {groups!r}")
    return int(groups)


def _smallest_input(weight_shape: tuple[int, ...], dilation: tuple[int, int]) -> tuple[int, int]:
    """The smallest input height and width the (dilated) kernel fits in without padding."""
    return (dilation[0] * (weight_shape[2] - 1) + 1, dilation[1] * (weight_shape[3] - 1) + 1)
