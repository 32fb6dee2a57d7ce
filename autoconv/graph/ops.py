"""The operators of common CNNs besides Conv, as vectorised numpy on NCHW arrays (on shared-memory
devices the arrays are views of device memory): what a prepared ONNX model runs between its
convolution layers. Each takes the node's input arrays (None for an omitted optional input) and
its attributes, and returns its outputs. Semantics follow the ONNX operator specs; the tests
compare each with onnxruntime."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

Arrays = Sequence[Any]
Op = Callable[[Arrays, dict[str, Any], int], list[np.ndarray]]


Pads = list[tuple[int, int]]


def pool_geometry(x: np.ndarray, attrs: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], Pads, Pads]:
    """(kernel, strides, per spatial axis (pad before, pad after) with ceil_mode's extra end
    padding, the same without it): auto_pad included."""
    kernel = tuple(int(k) for k in attrs["kernel_shape"])
    dims = len(kernel)
    strides = tuple(int(s) for s in attrs.get("strides", (1,) * dims))
    dilations = tuple(int(d) for d in attrs.get("dilations", (1,) * dims))
    if any(d != 1 for d in dilations):
        raise NotImplementedError("dilated pooling")
    spatial = x.shape[2:]
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s in zip(spatial, kernel, strides):
            total = max(0, (math.ceil(size / s) - 1) * s + k - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    elif auto_pad == "VALID":
        pads = [(0, 0)] * dims
    else:
        flat = [int(p) for p in attrs.get("pads", (0,) * (2 * dims))]
        pads = [(flat[i], flat[i + dims]) for i in range(dims)]
    explicit = pads
    if int(attrs.get("ceil_mode", 0)):
        grown = []
        for (before, after), size, k, s in zip(pads, spatial, kernel, strides):
            out = math.ceil((size + before + after - k) / s) + 1
            if (out - 1) * s >= size + before:  # the last window must start inside the input or its front pad
                out -= 1
            grown.append((before, max(after, (out - 1) * s + k - size - before)))
        pads = grown
    return kernel, strides, pads, explicit


def _reduce_windows(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: Pads, fill: float,
                    combine: Callable[..., Any]) -> np.ndarray:
    """Each window of the padded input reduced by `combine` (np.maximum, np.add), one strided slice
    per kernel tap: a handful of whole-array operations instead of a window view's slow reduction."""
    padded = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=fill) if any(p != (0, 0) for p in pads) else x
    out_shape = [(size - k) // s + 1 for size, k, s in zip(padded.shape[2:], kernel, strides)]
    result: np.ndarray | None = None
    for taps in itertools.product(*(range(k) for k in kernel)):
        window = padded[(slice(None), slice(None)) + tuple(slice(t, t + s * (n - 1) + 1, s)
                                                           for t, s, n in zip(taps, strides, out_shape))]
        result = window.copy() if result is None else combine(result, window, out=result)
    assert result is not None
    return result


def max_pool(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    kernel, strides, pads, _ = pool_geometry(x, attrs)
    return [_reduce_windows(x, kernel, strides, pads, -np.inf, np.maximum)]


def average_pool(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    kernel, strides, pads, explicit = pool_geometry(x, attrs)
    sums = _reduce_windows(x.astype(np.float64), kernel, strides, pads, 0.0, np.add)
    # What each window divides by: its input elements, and its explicit pads with count_include_pad
    # (never ceil_mode's overhang past them, as onnxruntime).
    counted = (np.ones([1, 1, *(size + b + a for size, (b, a) in zip(x.shape[2:], explicit))])
               if int(attrs.get("count_include_pad", 0)) else np.ones((1, 1, *x.shape[2:])))
    rest = [(b - eb, a - ea) for (b, a), (eb, ea) in zip(pads, explicit)] if int(attrs.get("count_include_pad", 0)) \
        else pads
    counts = _reduce_windows(counted, kernel, strides, rest, 0.0, np.add)
    return [(sums / counts).astype(x.dtype)]


def global_average_pool(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float64).astype(x.dtype)]


def global_max_pool(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    return [x.max(axis=tuple(range(2, x.ndim)), keepdims=True)]


def concat(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    return [np.concatenate([np.asarray(i) for i in inputs if i is not None], axis=int(attrs["axis"]))]


def gemm(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    a, b = np.asarray(inputs[0]), np.asarray(inputs[1])
    if int(attrs.get("transA", 0)):
        a = a.T
    if int(attrs.get("transB", 0)):
        b = b.T
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + float(attrs.get("beta", 1.0)) * np.asarray(inputs[2])
    return [y.astype(a.dtype, copy=False)]


def matmul(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    return [np.matmul(np.asarray(inputs[0]), np.asarray(inputs[1]))]


def flatten(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    axis = int(attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]


def reshape(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    shape = [int(v) for v in np.asarray(inputs[1] if opset >= 5 else attrs["shape"]).ravel()]
    if not int(attrs.get("allowzero", 0)):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return [x.reshape(shape)]


def transpose(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    perm = attrs.get("perm")
    return [np.ascontiguousarray(np.transpose(x, None if perm is None else [int(p) for p in perm]))]


def softmax(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    if opset < 13:  # the input is seen as 2-D: [prod(shape[:axis]), prod(shape[axis:])]
        axis = int(attrs.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
        return [(shifted / shifted.sum(axis=1, keepdims=True)).reshape(x.shape)]
    axis = int(attrs.get("axis", -1))
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return [shifted / shifted.sum(axis=axis, keepdims=True)]


def lrn(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    size = int(attrs["size"])
    alpha, beta, bias = float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)), float(attrs.get("bias", 1.0))
    before = (size - 1) // 2
    # The window's sum of squares as `size` shifted adds in the input's dtype (a running sum would
    # lose the small channels to cancellation); each channel's window clipped at the edges.
    squares = np.square(x)
    window = squares.copy()
    channels = x.shape[1]
    for shift in range(-before, size - before):
        if shift:
            lo, hi = max(0, -shift), min(channels, channels - shift)
            window[:, lo:hi] += squares[:, lo + shift:hi + shift]
    scale = window
    scale *= x.dtype.type(alpha / size)
    scale += x.dtype.type(bias)
    if beta == 0.75:  # AlexNet's and GoogLeNet's: two square roots, several times cheaper than a power
        root = np.sqrt(scale)
        scale = root * np.sqrt(root)
    else:
        scale = np.power(scale, x.dtype.type(beta))
    return [(x / scale).astype(x.dtype, copy=False)]


def identity(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    return [np.asarray(inputs[0])]


def dropout(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    """Inference: the input, and an all-true mask for a second output."""
    x = np.asarray(inputs[0])
    return [x, np.ones(x.shape, dtype=bool)]


def _binary(function: Callable[[Any, Any], Any]) -> Op:
    def op(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
        a, b = np.asarray(inputs[0]), np.asarray(inputs[1])
        if opset < 7 and int(attrs.get("broadcast", 0)) and "axis" in attrs:  # legacy axis broadcast
            axis = int(attrs["axis"])
            b = b.reshape(b.shape + (1,) * (a.ndim - axis - b.ndim))
        return [function(a, b).astype(a.dtype, copy=False)]
    return op


def sum_(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    total = np.asarray(inputs[0])
    for other in inputs[1:]:
        total = total + np.asarray(other)
    return [total]


def relu(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    return [np.maximum(x, np.zeros((), x.dtype))]  # numpy's maximum keeps NaN, as torch and onnxruntime


def clip(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    if opset >= 11:
        low = None if len(inputs) < 2 or inputs[1] is None else np.asarray(inputs[1]).item()
        high = None if len(inputs) < 3 or inputs[2] is None else np.asarray(inputs[2]).item()
    else:
        low, high = attrs.get("min"), attrs.get("max")
    y = x
    if low is not None:
        y = np.where(y < low, np.asarray(low, x.dtype), y)
    if high is not None:
        y = np.where(y > high, np.asarray(high, x.dtype), y)
    return [y]


def sigmoid(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    return [(1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(x.dtype)]


def pad(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if opset >= 11:
        flat = [int(v) for v in np.asarray(inputs[1]).ravel()]
        value = 0.0 if len(inputs) < 3 or inputs[2] is None else float(np.asarray(inputs[2]).item())
    else:
        flat, value = [int(v) for v in attrs["pads"]], float(attrs.get("value", 0.0))
    widths = [(flat[i], flat[i + x.ndim]) for i in range(x.ndim)]
    if any(b < 0 or a < 0 for b, a in widths):
        raise NotImplementedError("negative pads")
    if mode == "constant":
        return [np.pad(x, widths, constant_values=value)]
    if mode == "reflect":
        return [np.pad(x, widths, mode="reflect")]
    if mode == "edge":
        return [np.pad(x, widths, mode="edge")]
    raise NotImplementedError(f"Pad mode {mode!r}")


def split(inputs: Arrays, attrs: dict[str, Any], opset: int, outputs: int = 1) -> list[np.ndarray]:
    x = np.asarray(inputs[0])
    axis = int(attrs.get("axis", 0))
    sizes = (np.asarray(inputs[1]).ravel().tolist() if opset >= 13 and len(inputs) > 1 and inputs[1] is not None
             else attrs.get("split"))
    if sizes is None:
        count = int(attrs.get("num_outputs", outputs))
        chunk = -(-x.shape[axis] // count)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
    edges = np.cumsum([int(s) for s in sizes])[:-1]
    return list(np.split(x, edges, axis=axis))


def batch_normalization(inputs: Arrays, attrs: dict[str, Any], opset: int) -> list[np.ndarray]:
    """Inference mode: (x - mean) / sqrt(var + epsilon) * scale + bias, per channel."""
    x, scale, bias, mean, var = (np.asarray(i) for i in inputs[:5])
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(attrs.get("epsilon", 1e-5)))
    shift = bias - mean * factor
    # The per-channel factors in float64, applied in the input's dtype (no float64 copy of x).
    return [x * factor.astype(x.dtype).reshape(shape) + shift.astype(x.dtype).reshape(shape)]


def affine_map(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """x * scale + shift per channel (axis 1), the factors given in float64 and applied in x's dtype."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.astype(x.dtype).reshape(shape) + shift.astype(x.dtype).reshape(shape)


def activate(x: np.ndarray, activation: str | None) -> np.ndarray:
    """A fused activation ("relu", "relu6" or None) applied as the Relu / Clip(0, 6) node would."""
    if activation == "relu":
        return relu([x], {}, 13)[0]
    if activation == "relu6":
        return clip([x, np.float32(0.0), np.float32(6.0)], {}, 13)[0]
    return x


OPS: dict[str, Op] = {
    "MaxPool": max_pool, "AveragePool": average_pool, "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool, "Concat": concat, "Gemm": gemm, "MatMul": matmul, "Flatten": flatten,
    "Reshape": reshape, "Transpose": transpose, "Softmax": softmax, "LRN": lrn, "Dropout": dropout,
    "Identity": identity, "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply),
    "Div": _binary(np.divide), "Sum": sum_, "Relu": relu, "Clip": clip, "Sigmoid": sigmoid, "Pad": pad,
    "BatchNormalization": batch_normalization,
}
# Split's output count comes from the node, not from its inputs.
SPLIT = "Split"
