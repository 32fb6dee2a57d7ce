"""A learned cost model: gradient-boosted trees (scikit-learn's HistGradientBoostingRegressor) that
predict a config's time on a layer and a device from the layer's shape, the device's description
and the config's params, trained on every verified measurement the databases hold (AutoTVM's
XGBoost model in spirit, with TenSet's lesson that one model over many tasks transfers).

One model per algorithm (each has its own params). The target is the time per FLOP, in logs, so
that layers of any size teach each other. A measurement made on another device counts less the
less that device resembles this one (peer_weight): a new device starts from its peers' data.

The tuner asks it to rank a pool of valid random configs and measures the predicted best first;
the study's sampler (TPE) proposes beyond them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from autoconv.algorithms import Params, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.spec import ConvSpec
from autoconv.store.base import ResultStore, TimedConfig

# An algorithm with fewer measurements than this gets no model: a handful of rows ranks worse
# than the sampler on its own.
MIN_TRAINING_ROWS = 40
# Random valid configs drawn per ranking, and how many draws may be tried to find them (spaces
# with tight constraints reject most draws).
CANDIDATE_POOL = 500
DRAW_ATTEMPTS = 20 * CANDIDATE_POOL
# Measurements of another device weigh at most this much (then less the less alike the devices are).
PEER_WEIGHT = 0.5
# The trees: small, fixed, seeded; a few thousand rows train in well under a second on 2 cores.
TREE_SETTINGS: dict[str, Any] = {"max_iter": 200, "learning_rate": 0.1, "max_leaf_nodes": 31,
                                 "min_samples_leaf": 4, "l2_regularization": 1e-3}


def layer_features(spec: ConvSpec) -> list[float]:
    """What a config's speed depends on in the layer: per-group GEMM sizes, window, stride,
    output size, the layout's channel block, the epilogue."""
    return [math.log2(spec.c_per_group), math.log2(spec.k_per_group), math.log2(spec.h), math.log2(spec.w),
            float(spec.r), float(spec.s), float(spec.stride[0]), float(spec.stride[1]),
            float(spec.dilation[0]), float(spec.dilation[1]), math.log2(spec.groups), math.log2(spec.n),
            math.log2(spec.p * spec.q), math.log2(max(spec.flops, 1)), float(spec.block),
            float(spec.bias), float(spec.residual), float(spec.activation != "none")]


def device_features(device: Mapping[str, Any]) -> list[float]:
    """A device row's (or DeviceInfo's) numbers: compute units, local memory, work-group size, GPU or not."""
    return [float(device.get("compute_units") or 1), math.log2(max(int(device.get("local_mem_bytes") or 1), 1)),
            math.log2(max(int(device.get("max_work_group_size") or 1), 1)),
            float(device.get("device_type") == "gpu")]


def device_row(device: DeviceInfo) -> dict[str, Any]:
    """A DeviceInfo as the devices table describes it (what peer_weight and device_features read)."""
    return {"fingerprint": device.fingerprint(), "backend": device.backend, "vendor": device.vendor,
            "device_type": device.device_type, "compute_units": device.compute_units,
            "local_mem_bytes": device.local_mem_bytes, "max_work_group_size": device.max_work_group_size}


def peer_weight(mine: Mapping[str, Any], other: Mapping[str, Any]) -> float:
    """How much a measurement on `other` counts when ranking for `mine`: 1 on the device itself;
    on a peer PEER_WEIGHT at most, halved per doubling of difference in compute units, local memory
    and work-group size, and a tenth of that across backends, vendors or device types."""
    if mine.get("fingerprint") == other.get("fingerprint"):
        return 1.0
    (units_a, memory_a, group_a, _), (units_b, memory_b, group_b, _) = device_features(mine), device_features(other)
    distance = abs(math.log2(units_a) - math.log2(units_b)) + abs(memory_a - memory_b) + abs(group_a - group_b)
    alike = all(mine.get(key) == other.get(key) for key in ("backend", "vendor", "device_type"))
    return PEER_WEIGHT * 0.5 ** distance * (1.0 if alike else 0.1)


def config_features(params: Params) -> list[float]:
    """The config's values in the algorithm's declared order (params that do not matter at their
    defaults, as the canonical form has them)."""
    canonical = params.space.canonical(params)
    return [float(canonical[name]) for name in canonical.space.names]


def features(spec: ConvSpec, device: Mapping[str, Any], params: Params) -> list[float]:
    return layer_features(spec) + device_features(device) + config_features(params)


def target(spec: ConvSpec, ms: float) -> float:
    """What the trees learn: log time per FLOP (layers of every size on one scale)."""
    return math.log(ms) - math.log(max(spec.flops, 1))


@dataclass
class CostModel:
    """The fitted trees per algorithm, for ranking configs on one device."""

    device: dict[str, Any]
    models: dict[str, Any]
    rows: dict[str, int]

    @classmethod
    def fit(cls, measured: Sequence[TimedConfig], devices: Mapping[str, Mapping[str, Any]], device: DeviceInfo, *,
            seed: int = 0) -> "CostModel":
        """Train on verified measurements (`devices`: the devices rows by fingerprint, for the
        features and weights of other devices' rows; rows of a device not described are left out)."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        mine = device_row(device)
        described = {**devices, mine["fingerprint"]: mine}
        by_algorithm: dict[str, list[TimedConfig]] = {}
        for row in measured:
            if row.device in described and get_algorithm(row.algorithm).space.params:
                by_algorithm.setdefault(row.algorithm, []).append(row)
        models, counts = {}, {}
        for algorithm, rows in sorted(by_algorithm.items()):
            if len(rows) < MIN_TRAINING_ROWS:
                continue
            x = np.array([features(r.spec, described[r.device], r.params) for r in rows])
            y = np.array([target(r.spec, r.median_ms) for r in rows])
            weights = np.array([peer_weight(mine, described[r.device]) for r in rows])
            model = HistGradientBoostingRegressor(random_state=seed, **TREE_SETTINGS)
            model.fit(x, y, sample_weight=weights)
            models[algorithm], counts[algorithm] = model, len(rows)
        return cls(mine, models, counts)

    def knows(self, algorithm: str) -> bool:
        return algorithm in self.models

    def predict_ms(self, spec: ConvSpec, algorithm: str, configs: Sequence[Params]) -> np.ndarray:
        """Predicted times (ms) of configs of `algorithm` on the layer, on this model's device."""
        if not configs:
            return np.zeros(0)
        x = np.array([features(spec, self.device, params) for params in configs])
        return np.exp(self.models[algorithm].predict(x)) * max(spec.flops, 1)

    def rank(self, spec: ConvSpec, algorithm: str, configs: Sequence[Params]) -> list[Params]:
        """The configs, predicted fastest first (ties in the given order)."""
        predicted = self.predict_ms(spec, algorithm, configs)
        return [configs[i] for i in np.argsort(predicted, kind="stable")]

    def propose(self, spec: ConvSpec, device: DeviceInfo, algorithm: str, count: int, *,
                exclude: Sequence[Params] = (), seed: int = 0) -> list[Params]:
        """The `count` predicted-fastest of a pool of valid random configs (canonical, none of
        `exclude`); empty when the algorithm has no model."""
        if not self.knows(algorithm) or count <= 0:
            return []
        pool = candidate_pool(spec, device, algorithm, exclude=exclude, seed=seed)
        return self.rank(spec, algorithm, pool)[:count]


def candidate_pool(spec: ConvSpec, device: DeviceInfo, algorithm: str, *, exclude: Sequence[Params] = (),
                   size: int = CANDIDATE_POOL, seed: int = 0) -> list[Params]:
    """Up to `size` distinct valid canonical configs drawn uniformly from the declared choices."""
    space = get_algorithm(algorithm).space
    limits = device.limits()
    rng = random.Random(seed)
    seen: set[Params] = set(exclude)
    pool: list[Params] = []
    for _ in range(DRAW_ATTEMPTS):
        if len(pool) >= size:
            break
        params = space.canonical(space.validate({decl.name: rng.choice(space.choices_on(decl, limits))
                                                 for decl in space.params}))
        if params in seen or params.violations(limits, spec):
            continue
        seen.add(params)
        pool.append(params)
    return pool


def training_data(stores: Sequence[ResultStore], template_hash: str | None = None
                  ) -> tuple[list[TimedConfig], dict[str, dict[str, Any]]]:
    """The stores' verified measurements and stored results (a shipped database holds only its
    winners) of one template hash, and their devices rows by fingerprint."""
    measured: list[TimedConfig] = []
    devices: dict[str, dict[str, Any]] = {}
    for store in stores:
        devices.update({row["fingerprint"]: row for row in store.devices()})
        measured += store.timed_configs(template_hash)
        measured += store.results(template_hash=template_hash)  # a TunedResult is a TimedConfig
    return measured, devices


def rank_correlation(model: CostModel, held_out: Sequence[TimedConfig]) -> dict[tuple[str, str], float]:
    """Spearman's rank correlation of predicted and measured times per (layer key, algorithm) of
    held-out measurements (groups of at least 5 distinct configs)."""
    from scipy.stats import spearmanr

    groups: dict[tuple[str, str], dict[Params, list[float]]] = {}
    for row in held_out:
        if model.knows(row.algorithm):
            groups.setdefault((row.spec.key(), row.algorithm), {}).setdefault(
                row.params.space.canonical(row.params), []).append(row.median_ms)
    specs = {row.spec.key(): row.spec for row in held_out}
    found = {}
    for (key, algorithm), timed in sorted(groups.items()):
        if len(timed) < 5:
            continue
        configs = list(timed)
        measured = [float(np.median(timed[p])) for p in configs]
        predicted = model.predict_ms(specs[key], algorithm, configs)
        rho = spearmanr(predicted, measured).statistic
        if math.isfinite(rho):
            found[(key, algorithm)] = float(rho)
    return found


__all__ = ["CostModel", "candidate_pool", "training_data", "device_features", "layer_features", "peer_weight", "rank_correlation"]
