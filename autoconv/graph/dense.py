"""A model's fully connected layers on the device: a Gemm or MatMul whose weights are constants is
a 1x1 convolution, run by an `autoconv.Conv2d` (resident weights, served as any layer is). The
batch becomes the width of a one-pixel-high image, so each weight is read once per call for every
image. At batch 1 such a layer is a matrix-vector product bound by reading its weights (AlexNet's
and VGG's classifiers: 58M and 124M of them): on a CPU device both cores read them, where the host
BLAS is held to one thread while the model runs (autoconv/graph/runner.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from autoconv.serve.layer import Conv2d

DENSE_OPS = ("Gemm", "MatMul")


@dataclass(frozen=True)
class DenseWeights:
    """y = x @ weight.T + bias: weight (m, k), bias (m,) or None, both float32."""

    weight: np.ndarray
    bias: np.ndarray | None


def dense_weights(op_type: str, inputs: list[str], attrs: dict[str, Any],
                  constants: dict[str, np.ndarray]) -> DenseWeights | None:
    """The node as a dense layer, where its weights (and Gemm's C) are float32 constants and it
    multiplies a matrix from the left (transA = 0); None otherwise (numpy runs it)."""
    if op_type not in DENSE_OPS or len(inputs) < 2:
        return None
    b = constants.get(inputs[1])
    if b is None or b.ndim != 2 or b.dtype != np.float32:
        return None
    if op_type == "MatMul":
        return DenseWeights(np.ascontiguousarray(b.T), None)
    if int(attrs.get("transA", 0)):
        return None
    weight = b if int(attrs.get("transB", 0)) else b.T
    m = weight.shape[0]
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        weight = weight * np.float32(alpha)
    bias = None
    if len(inputs) > 2 and inputs[2]:
        c = constants.get(inputs[2])
        if c is None or c.dtype != np.float32 or c.size not in (1, m) or (c.size == m and c.shape[-1] != m):
            return None  # a C that varies along the batch, or is computed: numpy
        bias = np.broadcast_to(c.reshape(-1), (m,)) * np.float32(beta)
    return DenseWeights(np.ascontiguousarray(weight, dtype=np.float32),
                        None if bias is None else np.ascontiguousarray(bias, dtype=np.float32))


class DeviceDense:
    """A dense layer as a 1x1 convolution: `layer(a)` for a 2-D float32 `a` (n, k) gives (n, m); any
    other input gives None (the caller runs numpy's operator)."""

    def __init__(self, dense: DenseWeights, **layer_options: Any) -> None:
        self.m, self.k = dense.weight.shape
        self._layer = Conv2d(dense.weight.reshape(self.m, self.k, 1, 1), dense.bias, **layer_options)

    @property
    def plans(self) -> dict:
        return self._layer.plans

    def __call__(self, a: Any) -> np.ndarray | None:
        host = np.asarray(a)
        if host.ndim != 2 or host.dtype != np.float32 or host.shape[1] != self.k:
            return None
        n = host.shape[0]
        x = np.ascontiguousarray(host.T).reshape(1, self.k, 1, n)
        y = np.asarray(self._layer(x))  # (1, m, 1, n)
        return np.ascontiguousarray(y.reshape(self.m, n).T)
