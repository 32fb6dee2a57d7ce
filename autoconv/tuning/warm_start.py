"""Seeds for a new study: the configs that already won on layers like this one, so the sampler
starts from what worked instead of cold (the transfer of tuning records that TVM and Kernel
Tuner users ask for).

For one algorithm on one layer: the winners of the nearest tuned shapes of the same family on
this device (nearest first), then the same shape's winner on other devices of the same backend,
vendor and type. Only configs valid on this device and layer, each once, the default excluded."""

from __future__ import annotations

from typing import Sequence

from autoconv.algorithms import Params, get_algorithm
from autoconv.device import DeviceInfo
from autoconv.errors import InvalidParamsError
from autoconv.serve.lookup import DatabaseContents
from autoconv.spec import ConvSpec, same_family, shape_distance

# How many nearby shapes' winners seed a study (beyond them TPE does better on its own).
NEAREST_SHAPES = 3


def warm_start_configs(records: Sequence[DatabaseContents], device: DeviceInfo, spec: ConvSpec, algorithm: str,
                       default: Params, limit: int = NEAREST_SHAPES) -> list[Params]:
    """The seeds, in the order to try them."""
    space = get_algorithm(algorithm).space
    fingerprint = device.fingerprint()
    mine = [r for contents in records for r in contents.results if r.algorithm == algorithm]
    devices = {fp: row for contents in records for fp, row in contents.devices.items()}
    nearby = sorted((r for r in mine if r.device == fingerprint and r.spec != spec and same_family(r.spec, spec)),
                    key=lambda r: (shape_distance(r.spec, spec), r.spec.key()))
    peers = {fp for fp, row in devices.items()
             if fp != fingerprint and row.get("backend") == device.backend and row.get("vendor") == device.vendor
             and row.get("device_type") == device.device_type}
    same_shape = sorted((r for r in mine if r.device in peers and r.spec == spec), key=lambda r: r.median_ms)
    seeds: list[Params] = []
    for result in [*nearby[:limit], *same_shape]:
        try:
            params = space.canonical(space.validate(result.params))
        except InvalidParamsError:
            continue
        if params != default and params not in seeds and not params.violations(device.limits(), spec):
            seeds.append(params)
    return seeds
