"""Plan: which algorithm (with params validated by that algorithm's ParamSpace) runs a ConvSpec,
and where the choice came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from autoconv.algorithms import Params, get_algorithm


@dataclass(frozen=True)
class Plan:
    """An algorithm name, its params (validated on construction: a raw mapping is checked against
    the algorithm's declared space, missing params take their defaults) and the provenance."""

    algorithm: str
    params: Params | Mapping[str, Any] | None = None
    source: str = "heuristic"

    def __post_init__(self) -> None:
        space = get_algorithm(self.algorithm).space
        raw = self.params
        if isinstance(raw, Params) and raw.space is space:
            return
        object.__setattr__(self, "params", space.validate(raw))

    def describe(self) -> str:
        details = self.params.describe() if self.params else ""
        return f"{self.algorithm}{f' [{details}]' if details else ''} ({self.source})"
