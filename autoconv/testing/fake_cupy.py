"""FakeCupy: a test double for the part of CuPy that autoconv's CUDA backend uses, with kernels that
run on the CUDA simulator (autoconv.testing.cuda_simulator). It checks semantics, never speed.

What it stands in for: `RawModule(code=..., options=...)` with `compile()` and `get_function()`
and the launch `kernel(grid, block, args)`; `ndarray` over simulated device memory (shape, dtype,
flags, slicing, reshape, transpose, arithmetic, `get`/`set`, `__cuda_array_interface__`, DLPack);
`empty`/`zeros`/`asarray`/`ascontiguousarray`/`asnumpy`/`from_dlpack`; `matmul` (cuBLAS's part),
`maximum`/`clip` with `out=`; `cuda.runtime` (one device), `cuda.Device`, `Stream`,
`get_current_stream`, `Event` and `get_elapsed_time`; `cupyx.empty_pinned`.

Like CuPy, an ndarray refuses implicit conversion to numpy (`np.asarray(a)` raises TypeError) and
arithmetic with numpy arrays, so host/device mix-ups fail here as they do on a GPU. Unlike a GPU,
launches are synchronous, and after an illegal address the next call starts a fresh simulated
device instead of leaving the context unusable.

    modules = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", modules.cupy)
    monkeypatch.setitem(sys.modules, "cupyx", modules.cupyx)
"""

from __future__ import annotations

import time
import types
from typing import Any, Sequence

import numpy as np

from autoconv.testing.cuda_simulator import (MAX_BLOCK_DIMS, MAX_SHARED_BYTES, MAX_THREADS_PER_BLOCK, Allocation,
                                             CompileError, IllegalAddress, LaunchError, Module, Simulator)

DEVICE_NAME = "CUDA simulator (autoconv test double)"
DEVICE_MEMORY = 8 << 30
VERSION = 12080  # reported as CUDA 12.8, driver and runtime
DLPACK_CUDA = 2


class CUDARuntimeError(RuntimeError):
    pass


class CUDADriverError(RuntimeError):
    pass


class CompileException(RuntimeError):
    pass


class Device:
    """cupy.cuda.Device: a context manager selecting the (only) device."""

    def __init__(self, device: int | None = None) -> None:
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return self.id


class Stream:
    """Launches and copies are synchronous on the simulator: every stream is always idle."""

    null: "Stream"

    def synchronize(self) -> None:
        return None


Stream.null = Stream()


class Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded_at: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self.recorded_at = time.perf_counter()

    def synchronize(self) -> None:
        if self.recorded_at is None:
            raise CUDADriverError("CUDA_ERROR_INVALID_HANDLE: the event was never recorded")


def get_elapsed_time(start: Event, end: Event) -> float:
    if start.recorded_at is None or end.recorded_at is None:
        raise CUDADriverError("CUDA_ERROR_INVALID_HANDLE: the event was never recorded")
    return (end.recorded_at - start.recorded_at) * 1e3


class SimulatedDLPackCapsule:
    """What __dlpack__ hands over: a stand-in for the C capsule, describing CUDA memory."""

    def __init__(self, interface: dict[str, Any]) -> None:
        self.interface = interface
        self.consumed = False


class ndarray:  # noqa: N801 - CuPy's name
    """A CuPy-like array in simulated device memory: `_view` is that memory seen from the host."""

    __slots__ = ("_fake", "_allocation", "_view", "__weakref__")

    def __init__(self, fake: "FakeCupy", allocation: Allocation, view: np.ndarray) -> None:
        self._fake = fake
        self._allocation = allocation
        self._view = view

    # Attributes ---------------------------------------------------------------------------------
    shape = property(lambda self: self._view.shape)
    dtype = property(lambda self: self._view.dtype)
    size = property(lambda self: self._view.size)
    ndim = property(lambda self: self._view.ndim)
    nbytes = property(lambda self: self._view.nbytes)
    strides = property(lambda self: self._view.strides)
    itemsize = property(lambda self: self._view.itemsize)
    flags = property(lambda self: self._view.flags)
    device = property(lambda self: Device(0))

    @property
    def byte_offset(self) -> int:
        return self._view.__array_interface__["data"][0] - self._allocation.host.__array_interface__["data"][0]

    @property
    def device_address(self) -> int:
        return self._allocation.address + self.byte_offset

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.device_address, False), "version": 3,
                "strides": None if self.flags.c_contiguous else self.strides}

    def __dlpack_device__(self) -> tuple[int, int]:
        return (DLPACK_CUDA, 0)

    def __dlpack__(self, *, stream: Any = None, **kwargs: Any) -> SimulatedDLPackCapsule:
        return SimulatedDLPackCapsule(self.__cuda_array_interface__)

    # Views and copies ---------------------------------------------------------------------------
    def _wrap(self, result: np.ndarray) -> "ndarray":
        return self._fake._wrap(result, self._allocation)

    def reshape(self, *shape: Any, order: str = "C") -> "ndarray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self._wrap(self._view.reshape(shape, order=order))  # type: ignore[call-overload]

    def ravel(self) -> "ndarray":
        return self.reshape(-1)

    def transpose(self, *axes: Any) -> "ndarray":
        return self._wrap(self._view.transpose(*axes))

    @property
    def T(self) -> "ndarray":  # noqa: N802
        return self.transpose()

    def __getitem__(self, key: Any) -> "ndarray":
        return self._wrap(self._view[self._fake._key(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._view[self._fake._key(key)] = self._fake._operand(value)

    def astype(self, dtype: Any, copy: bool = True) -> "ndarray":
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self._fake._from_host(self._view.astype(dtype))

    def copy(self) -> "ndarray":
        return self._fake._from_host(self._view.copy())

    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        if out is None:
            return np.array(self._view, order=order)  # type: ignore[call-overload]
        if not isinstance(out, np.ndarray) or out.shape != self.shape:
            raise ValueError(f"get: out must be a numpy array of shape {self.shape}")
        out[...] = self._view
        return out

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"set: expected a numpy array, got {type(arr).__name__}")
        if arr.size != self.size:
            raise ValueError(f"set: {arr.size} elements given for an array of {self.size}")
        self._view[...] = arr.reshape(self.shape)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def __len__(self) -> int:
        return len(self._view)

    def __repr__(self) -> str:
        return f"fake_cupy.ndarray({self._view!r})"

    # Arithmetic ---------------------------------------------------------------------------------
    def _binary(self, other: Any, op: Any) -> "ndarray":
        return self._fake._from_host(op(self._view, self._fake._operand(other)))

    def _inplace(self, other: Any, op: Any) -> "ndarray":
        op(self._view, self._fake._operand(other), out=self._view)
        return self

    def __add__(self, other: Any) -> "ndarray":
        return self._binary(other, np.add)

    def __radd__(self, other: Any) -> "ndarray":
        return self._binary(other, np.add)

    def __sub__(self, other: Any) -> "ndarray":
        return self._binary(other, np.subtract)

    def __rsub__(self, other: Any) -> "ndarray":
        return self._fake._from_host(np.subtract(self._fake._operand(other), self._view))

    def __mul__(self, other: Any) -> "ndarray":
        return self._binary(other, np.multiply)

    def __rmul__(self, other: Any) -> "ndarray":
        return self._binary(other, np.multiply)

    def __truediv__(self, other: Any) -> "ndarray":
        return self._binary(other, np.divide)

    def __neg__(self) -> "ndarray":
        return self._fake._from_host(-self._view)

    def __iadd__(self, other: Any) -> "ndarray":
        return self._inplace(other, np.add)

    def __isub__(self, other: Any) -> "ndarray":
        return self._inplace(other, np.subtract)

    def __imul__(self, other: Any) -> "ndarray":
        return self._inplace(other, np.multiply)

    def sum(self, axis: Any = None) -> "ndarray":
        return self._fake._from_host(np.asarray(self._view.sum(axis=axis)))


class Function:
    """A kernel of a compiled RawModule: `function(grid, block, args)` launches it."""

    def __init__(self, fake: "FakeCupy", module: Module, name: str) -> None:
        self._fake, self._module, self.name = fake, module, name

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], *,
                 shared_mem: int = 0, stream: Any = None) -> None:
        if shared_mem:
            raise CUDADriverError("the simulator runs static shared memory only (shared_mem=0)")
        launch_args: list[tuple[Allocation, int] | int] = []
        for index, arg in enumerate(args):
            if isinstance(arg, ndarray):
                launch_args.append((arg._allocation, arg.byte_offset))
            elif isinstance(arg, (int, np.integer)) and not isinstance(arg, bool):
                launch_args.append(int(arg))
            else:
                raise TypeError(f"kernel argument {index} of {self.name}: unsupported type {type(arg).__name__}")
        self._fake._run(lambda: self._fake.simulator.launch(self._module, self.name, tuple(grid), tuple(block),
                                                            launch_args))


class RawModule:
    def __init__(self, fake: "FakeCupy", code: str, options: Sequence[str] = (), **kwargs: Any) -> None:
        self._fake, self.code, self.options = fake, code, tuple(options)
        self._module: Module | None = None

    def compile(self, log_stream: Any = None) -> None:
        if self._module is None:
            try:
                self._module = self._fake.simulator.compile(self.code)
            except CompileError as exc:
                raise CompileException(str(exc)) from None

    def get_function(self, name: str) -> Function:
        self.compile()
        assert self._module is not None
        if name not in self._module.entries:
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return Function(self._fake, self._module, name)


class FakeCupy:
    """One simulated CUDA device, and the `cupy` and `cupyx` modules that reach it."""

    def __init__(self, simulator: Simulator | None = None) -> None:
        self.simulator = simulator or Simulator()
        self.cupy = self._cupy_module()
        self.cupyx = types.ModuleType("cupyx", "fake cupyx (autoconv test double)")
        self.cupyx.empty_pinned = lambda shape, dtype=np.float32: np.empty(shape, dtype=dtype)  # type: ignore[attr-defined]

    # Memory -------------------------------------------------------------------------------------
    def empty(self, shape: Any, dtype: Any = np.float32) -> ndarray:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(v) for v in shape)
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        allocation = self._run(lambda: self.simulator.allocate(count * dtype.itemsize))
        view = allocation.host[: count * dtype.itemsize].view(dtype).reshape(shape)
        return ndarray(self, allocation, view)

    def zeros(self, shape: Any, dtype: Any = np.float32) -> ndarray:
        array = self.empty(shape, dtype)
        array._view[...] = 0
        return array

    def _from_host(self, host: Any) -> ndarray:
        host = np.asarray(host)
        array = self.empty(host.shape, host.dtype)
        array._view[...] = host
        return array

    def _wrap(self, result: np.ndarray, allocation: Allocation) -> ndarray:
        """A view of the allocation when `result` lies in its memory, else a new device copy."""
        if result.size and np.may_share_memory(result, allocation.host):
            return ndarray(self, allocation, result)
        return self._from_host(result)

    def _operand(self, value: Any) -> Any:
        if isinstance(value, ndarray):
            return value._view
        if isinstance(value, np.ndarray) and value.ndim > 0:
            raise TypeError("Unsupported type <class 'numpy.ndarray'>: copy it to the device first (cupy.asarray)")
        return value

    @staticmethod
    def _key(key: Any) -> Any:
        if isinstance(key, ndarray):
            raise TypeError("the simulator's arrays take basic indexing only")
        return key

    def _view_of(self, interface: dict[str, Any]) -> ndarray:
        address, _ = interface["data"]
        allocation, offset = self.simulator.find(int(address))
        dtype = np.dtype(interface["typestr"])
        view = np.ndarray(tuple(interface["shape"]), dtype=dtype, buffer=allocation.host, offset=offset,
                          strides=interface.get("strides"))
        return ndarray(self, allocation, view)

    def asarray(self, value: Any, dtype: Any = None) -> ndarray:
        if isinstance(value, ndarray):
            array = value
        elif hasattr(value, "__cuda_array_interface__"):
            array = self._view_of(value.__cuda_array_interface__)
        else:
            array = self._from_host(np.asarray(value))
        return array if dtype is None else array.astype(dtype, copy=False)

    def ascontiguousarray(self, value: Any, dtype: Any = None) -> ndarray:
        array = self.asarray(value, dtype)
        return array if array.flags.c_contiguous else array._fake._from_host(np.ascontiguousarray(array._view))

    def from_dlpack(self, value: Any) -> ndarray:
        kind, device = value.__dlpack_device__()
        if kind != DLPACK_CUDA or device != 0:
            raise ValueError(f"from_dlpack: memory of DLPack device ({kind}, {device}), not CUDA device 0")
        capsule = value.__dlpack__(stream=1)
        if not isinstance(capsule, SimulatedDLPackCapsule) or capsule.consumed:
            raise TypeError("from_dlpack: not a capsule of the simulated device (or one already consumed)")
        capsule.consumed = True
        return self._view_of(capsule.interface)

    @staticmethod
    def asnumpy(value: Any) -> np.ndarray:
        return value.get() if isinstance(value, ndarray) else np.asarray(value)

    # Compute ------------------------------------------------------------------------------------
    def matmul(self, a: ndarray, b: ndarray) -> ndarray:
        return self._from_host(np.matmul(self._operand(a), self._operand(b)))

    def _ufunc(self, op: Any, *args: Any, out: ndarray | None = None) -> ndarray:
        operands = [self._operand(a) for a in args]
        if out is None:
            return self._from_host(op(*operands))
        op(*operands, out=out._view)
        return out

    def _run(self, action: Any) -> Any:
        try:
            return action()
        except IllegalAddress as exc:
            raise CUDADriverError(f"CUDA_ERROR_ILLEGAL_ADDRESS: {exc}") from None
        except LaunchError as exc:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {exc}") from None

    def _properties(self, index: int) -> dict[str, Any]:
        Device(index)
        return {"name": DEVICE_NAME.encode(), "major": 9, "minor": 0, "multiProcessorCount": 2,
                "sharedMemPerBlock": MAX_SHARED_BYTES, "maxThreadsPerBlock": MAX_THREADS_PER_BLOCK,
                "maxThreadsDim": MAX_BLOCK_DIMS, "maxGridSize": (2**31 - 1, 65535, 65535),
                "totalGlobalMem": DEVICE_MEMORY}

    def _cupy_module(self) -> types.ModuleType:
        cupy = types.ModuleType("cupy", "fake cupy (autoconv test double): kernels run on the CUDA simulator")
        runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=self._properties,
                                        driverGetVersion=lambda: VERSION, runtimeGetVersion=lambda: VERSION,
                                        CUDARuntimeError=CUDARuntimeError)
        cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
            runtime=runtime, driver=types.SimpleNamespace(CUDADriverError=CUDADriverError),
            compiler=types.SimpleNamespace(CompileException=CompileException),
            Device=Device, Stream=Stream, Event=Event, get_elapsed_time=get_elapsed_time,
            get_current_stream=lambda: Stream.null)
        names = {"ndarray": ndarray, "float32": np.float32, "float64": np.float64, "int32": np.int32,
                 "empty": self.empty, "zeros": self.zeros, "asarray": self.asarray, "array": self.asarray,
                 "ascontiguousarray": self.ascontiguousarray, "asnumpy": self.asnumpy,
                 "from_dlpack": self.from_dlpack, "matmul": self.matmul,
                 "RawModule": lambda code, options=(), **kw: RawModule(self, code, options, **kw),
                 "maximum": lambda a, b, out=None: self._ufunc(np.maximum, a, b, out=out),
                 "minimum": lambda a, b, out=None: self._ufunc(np.minimum, a, b, out=out),
                 "clip": lambda a, lo, hi, out=None: self._ufunc(np.clip, a, lo, hi, out=out),
                 "fake_cupy": self}
        for name, value in names.items():
            setattr(cupy, name, value)
        return cupy
