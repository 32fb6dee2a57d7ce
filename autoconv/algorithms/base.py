"""The algorithm plug-in contract, as MIOpen's solvers: an Algorithm says whether it supports a
layer on a device (and why not), declares its tunables once in a ParamSpace (default, meaning,
choices, constraints, and when each param matters), gives a heuristic config, and renders its
kernels for a dialect. The tuner, the lookup, the backends and export ask the registry and never
branch on an algorithm's name.

A config is data: only ints validated against the declared choices ever reach a template."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from autoconv.device import DeviceInfo, DeviceLimits
from autoconv.errors import InvalidParamsError
from autoconv.render import Dialect, KernelSource
from autoconv.spec import ConvSpec

PARAM_BOUNDS = (0, 1024)  # every value is an int in this range whatever a DB row says



@dataclass(frozen=True)
class ParamDecl:
    """One tunable: its name, default, one-line meaning, the values the tuner may pick, and when it
    matters (a param that does not matter keeps its default, is not sampled, and two configs that
    differ only in it are the same kernel)."""

    name: str
    default: int
    meaning: str
    choices: tuple[int, ...]
    active_when: Callable[[Mapping[str, int]], bool] | None = None
    device_limit: Callable[[DeviceLimits], int] | None = None  # choices above it are not sampled

    def active(self, values: Mapping[str, int]) -> bool:
        return self.active_when is None or bool(self.active_when(values))


@dataclass(frozen=True)
class Constraint:
    """A named rule a config must satisfy on a device, checked before anything is compiled."""

    name: str
    meaning: str
    holds: Callable[["Params", DeviceLimits], bool]


@dataclass(frozen=True)
class LayerConstraint:
    """A named rule a config must satisfy on a layer (an accuracy bound that depends on C, say),
    checked with the device constraints wherever the layer is known."""

    name: str
    meaning: str
    holds: Callable[["Params", ConvSpec], bool]


class Params(Mapping[str, int]):
    """An algorithm's validated config: a frozen, hashable mapping of param names to ints, read as
    attributes too (params.MWG). Built only by ParamSpace.validate."""

    __slots__ = ("_items", "_space")
    _items: tuple[tuple[str, int], ...]
    _space: "ParamSpace"

    def __init__(self, items: tuple[tuple[str, int], ...], space: "ParamSpace") -> None:
        object.__setattr__(self, "_items", items)
        object.__setattr__(self, "_space", space)

    def __getitem__(self, name: str) -> int:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no param {name!r} (params: {', '.join(k for k, _ in self._items)})") from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Params are frozen")

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self._items == other._items

    def __repr__(self) -> str:
        return "Params(" + ", ".join(f"{k}={v}" for k, v in self._items) + ")"

    @property
    def space(self) -> "ParamSpace":
        """The declaration these params were validated against."""
        return self._space

    def as_dict(self) -> dict[str, int]:
        return dict(self._items)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self._items)

    def violations(self, limits: DeviceLimits, spec: ConvSpec | None = None) -> list[str]:
        """Names and meanings of every constraint this config breaks on a device, and on a layer
        when one is given (empty: valid)."""
        return self._space.violations(self, limits, spec)

    def replace(self, **changes: int) -> "Params":
        return self._space.validate({**self.as_dict(), **changes})


@dataclass(frozen=True)
class ParamSpace:
    """An algorithm's tunables and their named constraints, declared once: validation, the tuner's
    sampling, canonical forms and the docs all read this one declaration."""

    params: tuple[ParamDecl, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    layer_constraints: tuple[LayerConstraint, ...] = ()
    _by_name: dict[str, ParamDecl] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {decl.name: decl for decl in self.params})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(decl.name for decl in self.params)

    def decl(self, name: str) -> ParamDecl:
        return self._by_name[name]

    def validate(self, raw: Mapping[str, Any] | None = None) -> Params:
        """Untrusted data (a DB row, a CLI string, a caller's dict) to Params, or InvalidParamsError.
        Unknown names, non-integers and values outside a param's choices are refused; a missing
        param takes its default."""
        raw = {} if raw is None else raw
        if isinstance(raw, Params):
            raw = raw.as_dict()
        if not isinstance(raw, Mapping):
            raise InvalidParamsError(f"params: expected a mapping of names to ints, got {type(raw).__name__}")
        unknown = sorted(str(name) for name in set(raw) - set(self._by_name))
        if unknown:
            raise InvalidParamsError(f"unknown parameter(s) {unknown}; known: {sorted(self._by_name)}")
        items = []
        for decl in self.params:
            value = raw.get(decl.name, decl.default)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidParamsError(f"{decl.name}: expected an int, got {value!r}")
            value = int(value)
            if not PARAM_BOUNDS[0] <= value <= PARAM_BOUNDS[1] or value not in decl.choices:
                raise InvalidParamsError(f"{decl.name}: {value} is not one of {decl.choices} ({decl.meaning})")
            items.append((decl.name, value))
        return Params(tuple(items), self)

    def defaults(self, **overrides: int) -> Params:
        return self.validate(overrides)

    def violations(self, params: Params, limits: DeviceLimits, spec: ConvSpec | None = None) -> list[str]:
        broken = [f"{c.name}: {c.meaning}" for c in self.constraints if not c.holds(params, limits)]
        return broken + (self.layer_violations(params, spec) if spec is not None else [])

    def layer_violations(self, params: Params, spec: ConvSpec) -> list[str]:
        """The layer constraints alone (what a config breaks on this layer on any device)."""
        return [f"{c.name}: {c.meaning}" for c in self.layer_constraints if not c.holds(params, spec)]

    def check(self, params: Params, limits: DeviceLimits, spec: ConvSpec | None = None) -> None:
        """Raise InvalidParamsError naming every broken constraint; used before anything is compiled."""
        broken = self.violations(params, limits, spec)
        if broken:
            raise InvalidParamsError(f"config {params.describe()} breaks: " + "; ".join(broken))

    def sampled_values(self, params: Params) -> dict[str, int]:
        """The params that matter for this config (what a study samples and enqueue_trial takes)."""
        values: dict[str, int] = {}
        for decl in self.params:
            if decl.active(values):
                values[decl.name] = params[decl.name]
        return values

    def canonical(self, params: Params) -> Params:
        """The config with params that do not matter at their defaults: equal kernels compare equal."""
        return self.validate(self.sampled_values(params))

    def choices_on(self, decl: ParamDecl, limits: DeviceLimits) -> tuple[int, ...]:
        if decl.device_limit is None:
            return decl.choices
        limit = decl.device_limit(limits)
        return tuple(c for c in decl.choices if c <= limit) or (min(decl.choices),)

    def suggest(self, trial: Any, limits: DeviceLimits) -> Params:
        """Sample a config with an Optuna trial: each param in declaration order, only when active."""
        values: dict[str, int] = {}
        for decl in self.params:
            if decl.active(values):
                values[decl.name] = trial.suggest_categorical(decl.name, self.choices_on(decl, limits))
        return self.validate(values)

    def random_valid(self, limits: DeviceLimits, rng: random.Random, spec: ConvSpec | None = None) -> Iterator[Params]:
        """An endless stream of valid configs drawn uniformly from the declared choices (the spaces
        are too large to list)."""
        if not self.params:
            while True:
                yield self.validate({})
        while True:
            params = self.validate({d.name: rng.choice(d.choices) for d in self.params})
            if not self.violations(params, limits, spec):
                yield params

    def all_valid(self, limits: DeviceLimits, spec: ConvSpec | None = None) -> Iterator[Params]:
        """Every valid config (small spaces and tests only)."""
        for combo in itertools.product(*(d.choices for d in self.params)):
            params = self.validate(dict(zip(self.names, combo)))
            if not self.violations(params, limits, spec):
                yield params


EMPTY_SPACE = ParamSpace()


# Roughly where CPUs and GPUs turn compute-bound: a FLOP costs about a tenth of a byte moved.
FLOPS_PER_BYTE = 10


@runtime_checkable
class Algorithm(Protocol):
    """A way of computing a convolution, plugged into the registry.

    - `name` and `title` (how tables name it);
    - where it runs: `device_kernels` (generated kernels a device backend launches), `host_code`
      (`run_host` computes it on the host), `library_gemm` (its kernels prepare operands for a
      device backend's own BLAS, which a backend runs only if it has one: cuBLAS on CUDA);
    - `space`: its tunables (EMPTY_SPACE when it has none);
    - `layouts`: the activation layouts its kernels read and write (autoconv.layouts);
    - `supports(spec, device)`: None, or a one-line reason why not (the layout included);
    - `heuristic(spec, device)`: an untuned config that fits the device;
    - `kernels(spec, params, dialect)`: the rendered kernels in launch order (device algorithms);
    - `scratch_bytes(spec, params)`: the extra device memory it needs beyond input, weight and output;
    - `extra_host_bytes(spec)`: the extra host memory a host run needs;
    - `traffic_bytes(spec, params)`: the bytes a run must move to and from memory, modelled with
      ideal caches (each operand and intermediate once) unless the algorithm re-reads by design;
    - `estimated_cost(spec, params)`: a relative cost of one run (bytes moved plus the FLOPs it
      executes, at FLOPS_PER_BYTE), comparable between layers for the same algorithm and params:
      the lookup scales a time measured on one layer to another by its ratio;
    - `run_host(spec, x, weight, bias)`: the result computed on the host (host algorithms).
    """

    name: str
    title: str
    device_kernels: bool
    host_code: bool
    library_gemm: bool
    space: ParamSpace
    layouts: tuple[str, ...]

    def supports(self, spec: ConvSpec, device: DeviceInfo) -> str | None:
        ...

    def heuristic(self, spec: ConvSpec, device: DeviceInfo) -> Params:
        ...

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        ...

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        ...

    def extra_host_bytes(self, spec: ConvSpec) -> int:
        ...

    def traffic_bytes(self, spec: ConvSpec, params: Params) -> int:
        ...

    def estimated_cost(self, spec: ConvSpec, params: Params) -> float:
        ...

    def run_host(self, spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        ...


class AlgorithmDefaults:
    """What most algorithms share: supports every layer, needs no scratch or extra host memory,
    has no host code and no tunables. An algorithm overrides what differs."""

    device_kernels = False
    host_code = False
    library_gemm = False
    space = EMPTY_SPACE
    layouts: tuple[str, ...] = ("NCHW",)

    def supports(self, spec: ConvSpec, device: DeviceInfo) -> str | None:
        """The layout first, then the shape (`supports_shape`)."""
        if spec.layout not in self.layouts:
            return f"not supported: layout {spec.layout} (reads and writes {', '.join(self.layouts)})"
        return self.supports_shape(spec, device)

    def supports_shape(self, spec: ConvSpec, device: DeviceInfo) -> str | None:
        return None

    def heuristic(self, spec: ConvSpec, device: DeviceInfo | None) -> Params:
        return self.space.validate({})

    def kernels(self, spec: ConvSpec, params: Params, dialect: Dialect) -> list[KernelSource]:
        return []

    def scratch_bytes(self, spec: ConvSpec, params: Params) -> int:
        return 0

    def extra_host_bytes(self, spec: ConvSpec) -> int:
        return 0

    def traffic_bytes(self, spec: ConvSpec, params: Params) -> int:
        """Input, weights and output once, and any scratch written once and read once."""
        return spec.input_bytes + spec.weight_bytes + spec.output_bytes + 2 * self.scratch_bytes(spec, params)

    def estimated_cost(self, spec: ConvSpec, params: Params) -> float:
        """Its traffic plus the direct convolution's FLOPs (an algorithm that executes fewer, like
        Winograd, says so)."""
        return self.traffic_bytes(spec, params) + spec.flops / FLOPS_PER_BYTE

    def run_host(self, spec: ConvSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError(f"{getattr(self, 'name', type(self).__name__)} has no host code")
