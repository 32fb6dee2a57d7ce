"""Plan: which algorithm (with params validated by that algorithm's ParamSpace) runs a ConvSpec,
and where the choice came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from autoconv.algorithms import Params, get_algorithm


@dataclass(frozen=True, init=False)
class Plan:
    """An algorithm name, its params (validated on construction: a raw mapping is checked against
    the algorithm's declared space, missing params take their defaults) and the provenance."""

    algorithm: str
    params: Params
    source: str

    def __init__(self, algorithm: str, params: Params | Mapping[str, Any] | None = None,
                 source: str = "heuristic") -> None:
        space = get_algorithm(algorithm).space
        validated = params if isinstance(params, Params) and params.space is space else space.validate(params)
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "params", validated)
        object.__setattr__(self, "source", source)

    def describe(self) -> str:
        details = self.params.describe() if self.params else ""
        return f"{self.algorithm}{f' [{details}]' if details else ''} ({self.source})"
