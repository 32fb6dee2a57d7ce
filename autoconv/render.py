"""Render kernel templates into sources with their launch geometry.

OpenCL and CUDA differ only by the data on a Dialect; the kernel bodies in templates/shared/ are
the same text for both. Only validated params (small ints) ever reach a template; each
algorithm module (autoconv/algorithms/) renders its own kernels with these helpers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from autoconv.spec import ConvSpec


@dataclass(frozen=True)
class Dialect:
    """What a kernel language spells differently; rendered as macros by templates/shared/prelude.j2."""

    name: str
    file_suffix: str
    kernel: str
    global_space: str
    local_space: str
    local_pointer: str  # qualifier of a pointer into local memory ("" where pointers are generic)
    restrict: str
    barrier: str
    local_id: str
    group_id: str
    global_id: str
    index_type: str
    vector_copy: str  # format string with {vw}, {dst}, {src}: copy vw floats global -> local
    vector_type: str  # format string with {n}: the n-wide float vector type ("" when none)
    vector_load: str  # with {n}, {ptr}: n contiguous floats as a vector
    vector_make: str  # with {n}, {elems}: a vector from n comma-separated floats
    vector_lane: str  # with {expr}, {lane}: one lane of a vector
    vector_store: str  # with {n}, {value}, {ptr}: store a vector as n contiguous floats
    max_vector_width: int


OPENCL = Dialect(
    name="opencl",
    file_suffix=".cl",
    kernel="__kernel",
    global_space="__global",
    local_space="__local",
    local_pointer="__local",
    restrict="restrict",
    barrier="barrier(CLK_LOCAL_MEM_FENCE)",
    local_id="get_local_id(d)",
    group_id="get_group_id(d)",
    global_id="((int)get_global_id(d))",
    index_type="size_t",
    vector_copy="vstore{vw}(vload{vw}(0, {src}), 0, {dst})",
    vector_type="float{n}",
    vector_load="vload{n}(0, {ptr})",
    vector_make="(float{n})({elems})",
    vector_lane="({expr}).s{lane:x}",
    vector_store="vstore{n}({value}, 0, {ptr})",
    max_vector_width=16,
)

CUDA = Dialect(
    name="cuda",
    file_suffix=".cu",
    kernel='extern "C" __global__',
    global_space="",
    local_space="__shared__",
    local_pointer="",
    restrict="__restrict__",
    barrier="__syncthreads()",
    local_id="((int)((d) == 0 ? threadIdx.x : (d) == 1 ? threadIdx.y : threadIdx.z))",
    group_id="((int)((d) == 0 ? blockIdx.x : (d) == 1 ? blockIdx.y : blockIdx.z))",
    global_id=(
        "((int)((d) == 0 ? blockIdx.x * blockDim.x + threadIdx.x : (d) == 1 ? "
        "blockIdx.y * blockDim.y + threadIdx.y : blockIdx.z * blockDim.z + threadIdx.z))"
    ),
    index_type="size_t",
    vector_copy="do {{ _Pragma(\"unroll\") for (int v_ = 0; v_ < {vw}; ++v_) {dst}[v_] = {src}[v_]; }} while (0)",
    vector_type="",
    vector_load="",
    vector_make="",
    vector_lane="",
    vector_store="",
    max_vector_width=1,
)

DIALECTS = {d.name: d for d in (OPENCL, CUDA)}


BUFFER_ARGS = ("input", "weight", "bias", "output", "scratch", "residual")


@dataclass(frozen=True)
class KernelArg:
    """One kernel argument: a buffer (input, weight, bias, output, the im2col scratch or the
    fused epilogue's residual) or an int whose value is fixed by the ConvSpec and params."""

    name: str
    kind: str  # one of BUFFER_ARGS, or "int"
    value: int = 0


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel: its text, entry point, arguments in order and the launch geometry for
    one ConvSpec. Backends bind `args` and export writes them: one description for both.

    global_size counts work-items (OpenCL convention); local_size None lets the runtime choose.
    once_per_weights: the kernel depends on the weights alone (a filter transform): it runs when
    they change, not on every call; the kernels after it read what it wrote to scratch.
    """

    text: str
    entry: str
    dialect: str
    global_size: tuple[int, int, int]
    local_size: tuple[int, int, int] | None
    args: tuple[KernelArg, ...] = ()
    once_per_weights: bool = False

    @property
    def source_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


# Characters that mean nothing to C, C++, OpenCL C or CUDA inside a comment or a string literal.
# Everything else (the '*' of a comment terminator, '\\', '"', '?' of trigraphs, '%' itself,
# control characters, NUL and non-ASCII) is written as %XX of its UTF-8 bytes.
SOURCE_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 -_.,:;()[]{}+=#<>!@&|~^'$/")


def source_text(value: object) -> str:
    """A string fit to go into a generated source or header (a comment or a string literal): the
    one way any text from a database, a device or a user reaches those files."""
    return "".join(ch if ch in SOURCE_SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
                   for ch in str(value))


def template_dir() -> Path:
    """templates/ inside an installed wheel, else the repository's top-level templates/."""
    packaged = Path(__file__).resolve().parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


# Templates of the runtime's own kernels (layout reorders, a model's pooling and per-channel
# affine maps), which no tuned result measures: editing them must not make every tuned database stale.
UNTUNED_TEMPLATES = frozenset({"shared/reorder.j2", "shared/pool.j2", "shared/affine.j2"})


@lru_cache(maxsize=1)
def template_hash() -> str:
    """Hash of every template the tuned algorithms' kernels render from: part of any key whose
    answer depends on the generated code. Computed once per process (the installed templates do
    not change under a running process)."""
    digest = hashlib.sha256()
    for path in sorted(template_dir().rglob("*.j2")):
        if path.relative_to(template_dir()).as_posix() in UNTUNED_TEMPLATES:
            continue
        digest.update(path.relative_to(template_dir()).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def render_template(name: str, **variables: object) -> str:
    """Render one template of templates/ with validated values only (Jinja's StrictUndefined)."""
    return _environment().get_template(name).render(**variables)


def int_args(**values: int) -> tuple[KernelArg, ...]:
    return tuple(KernelArg(name, "int", int(value)) for name, value in values.items())


def geometry_args(spec: ConvSpec) -> tuple[KernelArg, ...]:
    """The layer's geometry as int kernel arguments (the names templates/shared/patch.j2 uses)."""
    return int_args(C=spec.c, H=spec.h, W=spec.w, Cg=spec.c_per_group, R=spec.r, S=spec.s, P=spec.p, Q=spec.q,
                    SH=spec.stride[0], SW=spec.stride[1], PH=spec.padding[0], PW=spec.padding[1],
                    DH=spec.dilation[0], DW=spec.dilation[1])


def geometry_defines(spec: ConvSpec) -> dict[str, int]:
    """The same geometry as compile-time constants (divisions by constants are cheap)."""
    return {arg.name: arg.value for arg in geometry_args(spec)}


def ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
