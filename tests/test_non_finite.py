"""What each algorithm does with a NaN or an inf in its input (issue 22, items 2 and 6).

- The fused activation keeps NaN, as torch's relu/relu6 do (`torch.relu(nan) = nan`), on every
  algorithm, every backend and the host plan: comparisons, never fmax/fmin, which drop a NaN.
- Every algorithm but Winograd makes exactly the float64 reference's non-finite outputs: the same
  places, NaN where it has NaN, and the same signed infinities.
- Winograd spreads a non-finite input over every output of each tile whose input tile holds it
  (cuDNN's Winograd does the same; documented in autoconv/algorithms/winograd.py): never beyond
  those tiles, and for a NaN always over the reference's NaNs too.
"""

from __future__ import annotations

import numpy as np
import pytest

import autoconv
from autoconv import ConvSpec, get_algorithm
from autoconv.algorithms import WINOGRAD
from autoconv.tuning.verify import random_operands, reference_output
from conftest import plan_for

BASE = ConvSpec(1, 6, 11, 13, 8, 3, 3, padding=1, bias=True)
DEPTHWISE = ConvSpec(1, 6, 11, 13, 6, 3, 3, padding=1, groups=6, bias=True)  # the depthwise algorithm's layers
EPILOGUES = [dict(activation="relu"), dict(activation="relu6"), dict(activation="relu", residual=True),
             dict(activation="none")]
# (value, channel, row, col) of the poisoned input pixel: inside, and on the padded border.
POISONS = [(np.nan, 2, 5, 6), (np.inf, 4, 0, 12), (-np.inf, 0, 10, 3)]


def _non_finite_pattern(y: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +inf, 3 -inf: compared element by element."""
    return np.select([np.isnan(y), np.isposinf(y), np.isneginf(y)], [1, 2, 3], 0)


def _tiles_holding(mask: np.ndarray, side: int) -> np.ndarray:
    """Every output of each side×side output tile (all channels) that holds a marked output."""
    n, k, p, q = mask.shape
    tiles = np.zeros((n, -(-p // side), -(-q // side)), dtype=bool)
    for img, _, row, col in zip(*np.nonzero(mask)):
        tiles[img, row // side, col // side] = True
    grown = np.repeat(np.repeat(tiles, side, axis=1), side, axis=2)[:, :p, :q]
    return np.broadcast_to(grown[:, None], mask.shape)


@pytest.mark.parametrize("base", [BASE, DEPTHWISE], ids=["dense", "depthwise"])
@pytest.mark.parametrize("fused", EPILOGUES, ids=lambda e: "+".join(f"{v}" for v in e.values()))
def test_each_algorithm_keeps_the_references_non_finite_outputs(backend, fused, base):
    spec = base.replace(**fused)
    x, *rest = random_operands(spec, seed=7)
    for algorithm in backend.algorithms:
        if get_algorithm(algorithm).supports(spec, backend.device) is not None:
            continue
        plan = plan_for(backend, algorithm, spec)
        conv = backend.prepare(spec, plan)
        for value, channel, row, col in POISONS:
            poisoned = x.copy()
            poisoned[0, channel, row, col] = value
            operands = (poisoned, *rest)
            expected = _non_finite_pattern(reference_output(spec, operands))
            got = _non_finite_pattern(conv.run(*operands, poison=True))
            # relu6 clips both infinities to finite values: the pattern is then all finite.
            assert expected.any() or (np.isinf(value) and spec.activation == "relu6"), \
                "the poisoned pixel reaches no output: the test would prove nothing"
            where = f"{plan.describe()} on {spec}, input {value} at channel {channel}, ({row}, {col})"
            if algorithm != WINOGRAD:
                assert np.array_equal(got, expected), (
                    f"{where}: {np.count_nonzero(got)} non-finite outputs, the reference has "
                    f"{np.count_nonzero(expected)} (NaN {np.count_nonzero(got == 1)} vs {np.count_nonzero(expected == 1)})")
                continue
            # Where the pixel reaches before the activation (relu6 clips an inf the tiles still hold).
            reach = ~np.isfinite(reference_output(spec.replace(activation="none"), operands))
            tiles = _tiles_holding(reach, plan.params["TILE"])
            assert not (got.astype(bool) & ~tiles).any(), f"{where}: a non-finite output outside its tiles"
            if np.isnan(value):
                assert (got[expected > 0] == 1).all(), f"{where}: a NaN the reference keeps was lost"


@pytest.mark.parametrize("algorithm", [*autoconv.list_algorithms(), "host"])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_a_conv2d_layer_with_relu_keeps_a_nan_of_its_input(opencl, algorithm, activation):
    """The issue's scenario: Conv2d(w, b, padding=1, activation="relu") on an input holding one NaN."""
    spec = BASE.replace(activation=activation)
    if algorithm != "host" and get_algorithm(algorithm).supports(spec, opencl.device) is not None:
        pytest.skip(f"{algorithm} does not run {spec}")
    x, w, b = random_operands(spec, seed=11)
    x[0, 3, 4, 4] = np.nan
    layer = autoconv.Conv2d(w, b, padding=1, activation=activation,
                            **({"backend": "numpy"} if algorithm == "host" else {"algorithm": algorithm}))
    got = np.isnan(np.asarray(layer(x)))
    expected = np.isnan(reference_output(spec, (x, w, b)))
    assert expected.any() and (got[expected]).all(), f"{algorithm}: a NaN of the input was dropped by {activation}"
    if algorithm != WINOGRAD:
        assert np.array_equal(got, expected)
