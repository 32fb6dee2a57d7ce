"""The CUDA simulator: a test double that runs the rendered CUDA kernels on the CPU, to check their
semantics (never their speed) on machines without a GPU.

A kernel's .cu source is compiled by the host C++ compiler (g++ with OpenMP and AddressSanitizer)
with cuda_sim/sim_cuda.h in front, which maps CUDA's built-ins to one OpenMP team per block. The
kernels run in a separate device process (cuda_sim/worker.cpp), so a kernel that reads or writes
outside its buffers ends that process with AddressSanitizer's report, and the launch fails as an
illegal address fails on a GPU; the next call starts a fresh device process. Device memory is
files in shared memory that both processes map: each allocation sits between poisoned guard bytes
and inaccessible pages, and starts filled with NaN bytes, as uninitialised memory is garbage.

Needs g++ and libgomp (scripts/install_cuda_sim.sh). autoconv.testing.fake_cupy builds CuPy's
surface on top of this.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import platformdirs

SOURCE_DIR = Path(__file__).with_name("cuda_sim")
HEADER = SOURCE_DIR / "sim_cuda.h"
WORKER_SOURCE = SOURCE_DIR / "worker.cpp"
GUARD_BYTES = 256  # poisoned bytes before and after every allocation
MAX_SHARED_BYTES = 48 * 1024  # static shared memory a block may have, as on every CUDA GPU since sm_20
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIMS = (1024, 1024, 64)
MAX_GRID_DIMS = (2**31 - 1, 65535, 65535)
COMPILER = "g++"
COMMON_FLAGS = ("-std=c++17", "-O1", "-g", "-fopenmp", "-fsanitize=address", "-fno-omit-frame-pointer")
KERNEL_FLAGS = ("-fPIC", "-shared", "-Wno-unknown-pragmas", "-include", str(HEADER), "-x", "c++")
ENTRY = re.compile(r'(?:\bKERNEL|__global__)\s+void\s+(\w+)\s*\(')  # the templates' KERNEL macro, or plain CUDA
# One OpenMP thread per CUDA thread on a few cores: waiting threads must sleep, not spin.
WORKER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1",
              "OMP_WAIT_POLICY": "passive", "OMP_STACKSIZE": "1M", "OMP_DYNAMIC": "false",
              "OMP_MAX_ACTIVE_LEVELS": "1"}
SHM_DIR = Path("/dev/shm")
# A launch that runs longer is taken as hung: on the simulator, as on a GPU, a block whose threads
# do not all reach a __syncthreads() never finishes.
LAUNCH_TIMEOUT_S = float(os.environ.get("AUTOCONV_CUDA_SIM_TIMEOUT", "120"))


class SimulatorUnavailable(RuntimeError):
    """The host compiler the simulator needs is missing (install g++ and libgomp)."""


class CompileError(RuntimeError):
    """A CUDA source that the host compiler refused, or that asks for too much shared memory."""


class LaunchError(RuntimeError):
    """A launch the simulated device refused (bad configuration or arguments)."""


class IllegalAddress(RuntimeError):
    """A kernel read or wrote outside its buffers; the message holds AddressSanitizer's report."""


def cache_dir() -> Path:
    root = os.environ.get("AUTOCONV_CUDA_SIM_CACHE")
    return Path(root) if root else Path(platformdirs.user_cache_dir("autoconv")) / "cuda-sim"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _build(target: Path, command: list[str], what: str) -> Path:
    """Run a compiler command writing `target` once (atomically: a temporary name, then renamed)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    run = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
    if run.returncode != 0:
        partial.unlink(missing_ok=True)
        raise CompileError(f"{what} failed to compile:\n{run.stderr[-4000:]}")
    os.replace(partial, target)
    return target


def compiler() -> str:
    found = shutil.which(COMPILER)
    if found is None:
        raise SimulatorUnavailable("the CUDA simulator needs g++ with OpenMP: bash scripts/install_cuda_sim.sh")
    return found


def kernel_entries(source: str) -> list[str]:
    return ENTRY.findall(source)


def shared_bytes(library: Path, entry: str) -> int:
    """Bytes of static shared memory a compiled kernel declares: the sizes of its function-local
    statics (what sim_cuda.h makes of __shared__), from the symbol table."""
    run = subprocess.run(["objdump", "-t", str(library)], capture_output=True, text=True, check=True)
    prefix = f"_ZZ{len(entry)}{entry}E"
    return sum(int(fields[-2], 16) for fields in (line.split() for line in run.stdout.splitlines())
               if len(fields) >= 5 and fields[-1].startswith(prefix))


@dataclass(frozen=True)
class Module:
    """A compiled CUDA source: its shared library and its kernels' names."""

    library: Path
    entries: tuple[str, ...]


class Allocation:
    """One simulated device allocation: a shared-memory file of guard + data + guard bytes that the
    device process maps too. `host` is the data seen from this process (uint8)."""

    def __init__(self, simulator: "Simulator", ident: int, nbytes: int) -> None:
        self.ident = ident
        self.nbytes = nbytes
        self.address = Simulator.ADDRESS_BASE + (ident << Simulator.ADDRESS_SHIFT)  # a device address
        fd, name = tempfile.mkstemp(prefix="autoconv-cuda-sim-", dir=SHM_DIR if SHM_DIR.is_dir() else None)
        self.path = Path(name)
        try:
            total = nbytes + 2 * GUARD_BYTES
            os.ftruncate(fd, total)
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self.host = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=GUARD_BYTES)
        self.host.fill(0xFF)  # NaN in every float: uninitialised memory is not zeros
        self._finalizer = weakref.finalize(self, simulator._release, ident, self.path)


class Simulator:
    """The simulated device: compiles modules, holds allocations, runs launches (thread-safe)."""

    ADDRESS_BASE = 0x7000_0000_0000
    ADDRESS_SHIFT = 32  # one allocation at most 4 GiB

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._compile_lock = threading.Lock()
        self._next_id = 1
        self._allocations: "weakref.WeakValueDictionary[int, Allocation]" = weakref.WeakValueDictionary()
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._handles: dict[Path, int] = {}  # modules loaded in the current device process
        self.crashes = 0

    # Building -----------------------------------------------------------------------------------

    def worker(self) -> Path:
        digest = _digest(WORKER_SOURCE.read_bytes(), HEADER.read_bytes(), " ".join(COMMON_FLAGS).encode())
        return _build(cache_dir() / f"worker-{digest}", [compiler(), *COMMON_FLAGS, str(WORKER_SOURCE), "-ldl"],
                      "the CUDA simulator's device process")

    def compile(self, source: str, options: Sequence[str] = ()) -> Module:
        """A CUDA source as a loadable module (cached by the source and the header)."""
        entries = tuple(kernel_entries(source))
        if not entries:
            raise CompileError('no extern "C" __global__ kernel in the source')
        text = source + "\n" + "".join(f"SIM_ENTRY({name})\n" for name in entries)
        digest = _digest(text.encode(), HEADER.read_bytes(), " ".join((*COMMON_FLAGS, *options)).encode())
        folder = cache_dir() / "modules"
        library = folder / f"{digest}.so"
        if not library.exists():
            with self._compile_lock:
                folder.mkdir(parents=True, exist_ok=True)
                source_path = folder / f"{digest}.cu"
                partial = source_path.with_name(f".{source_path.name}.{os.getpid()}")
                partial.write_text(text)
                os.replace(partial, source_path)
                _build(library, [compiler(), *COMMON_FLAGS, *KERNEL_FLAGS, str(source_path)], entries[0])
        for entry in entries:
            used = shared_bytes(library, entry)
            if used > MAX_SHARED_BYTES:
                raise CompileError(f"{entry} uses {used} bytes of shared memory, more than the "
                                   f"{MAX_SHARED_BYTES} a block may have")
        return Module(library, entries)

    # Memory -------------------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> Allocation:
        if nbytes >= 1 << self.ADDRESS_SHIFT:
            raise LaunchError(f"cannot allocate {nbytes} bytes: the simulator's allocations are under 4 GiB")
        with self._lock:
            ident = self._next_id
            self._next_id += 1
            allocation = Allocation(self, ident, max(1, nbytes))
            self._allocations[ident] = allocation
            if self._process is not None:
                self._command(f"map {ident} {allocation.path} {allocation.nbytes} {GUARD_BYTES}")
        return allocation

    def find(self, address: int) -> tuple[Allocation, int]:
        """The allocation holding a device address, and the address's offset in it."""
        ident, offset = divmod(address - self.ADDRESS_BASE, 1 << self.ADDRESS_SHIFT)
        allocation = self._allocations.get(ident)
        if allocation is None or not 0 <= offset <= allocation.nbytes:
            raise LaunchError(f"{address:#x} is not a live device address")
        return allocation, offset

    def _release(self, ident: int, path: Path) -> None:
        path.unlink(missing_ok=True)
        try:
            with self._lock:
                if self._process is not None and self._process.poll() is None:
                    self._command(f"unmap {ident}")
        except (IllegalAddress, LaunchError, OSError):
            pass  # the device process is gone: its mappings went with it

    # Launching ----------------------------------------------------------------------------------

    def launch(self, module: Module, entry: str, grid: Sequence[int], block: Sequence[int],
               args: Sequence[tuple[Allocation, int] | int]) -> None:
        """Run one kernel: args are (allocation, byte offset) pointers and ints, in order."""
        grid3 = [*(int(v) for v in grid), 1, 1][:3]
        block3 = [*(int(v) for v in block), 1, 1][:3]
        if entry not in module.entries:
            raise LaunchError(f"named symbol not found: {entry}")
        threads = block3[0] * block3[1] * block3[2]
        if (not 0 < threads <= MAX_THREADS_PER_BLOCK or any(not 0 < b <= m for b, m in zip(block3, MAX_BLOCK_DIMS))
                or any(not 0 < g <= m for g, m in zip(grid3, MAX_GRID_DIMS))):
            raise LaunchError(f"invalid configuration argument: grid {tuple(grid3)}, block {tuple(block3)}")
        words = []
        for arg in args:
            if isinstance(arg, tuple):
                allocation, offset = arg
                words.append(f"p {allocation.ident} {offset}")
            else:
                value = int(arg)
                if not -2**31 <= value < 2**31:
                    raise LaunchError(f"kernel argument {value} does not fit an int")
                words.append(f"i {value}")
        with self._lock:
            handle = self._load(module)
            self._command(f"launch {handle} {entry} {' '.join(map(str, grid3 + block3))} {len(words)} "
                          + " ".join(words))

    def _load(self, module: Module) -> int:
        self._start()
        handle = self._handles.get(module.library)
        if handle is None:
            handle = int(self._command(f"load {module.library}").split()[1])
            self._handles[module.library] = handle
        return handle

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([str(self.worker())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True, bufsize=1,
                                         env={**os.environ, **WORKER_ENV})
        self._handles = {}
        for allocation in list(self._allocations.values()):
            self._command(f"map {allocation.ident} {allocation.path} {allocation.nbytes} {GUARD_BYTES}")

    def _command(self, line: str) -> str:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(line + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], LAUNCH_TIMEOUT_S)
            if not ready:
                process.kill()
                process.wait()
                self._process = None
                raise LaunchError(f"the launch did not finish within {LAUNCH_TIMEOUT_S:.0f} s (a block whose "
                                  "threads do not all reach a __syncthreads() hangs); the device was restarted")
            answer = process.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        if not answer:
            process.wait()
            self._process = None
            self.crashes += 1
            raise IllegalAddress(f"an illegal memory access was encountered (the simulated device stopped, "
                                 f"exit {process.returncode}):\n{self._report()}")
        answer = answer.rstrip("\n")
        if answer.startswith("err"):
            raise LaunchError(answer[4:])
        return answer

    def _report(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        summary = [line for line in lines if "ERROR: AddressSanitizer" in line or "SUMMARY" in line
                   or line.lstrip().startswith("#") or "is located" in line]
        return "\n".join((summary or lines)[:40])

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                if self._process.stdin is not None:
                    self._process.stdin.close()
                self._process.wait(timeout=10)
                if self._process.stdout is not None:
                    self._process.stdout.close()
                self._process = None
