"""Render kernel templates into sources with their launch geometry.

OpenCL and CUDA differ only by the data on a Dialect; the kernel bodies in templates/shared/ are
the same text for both. Only validated GemmParams (small ints) ever reach a template.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from autoconv.params import GEMM_PARAMS, GemmParams
from autoconv.spec import ConvSpec

ALGORITHM_IM2COL_GEMM = "im2col_gemm"
ALGORITHM_DIRECT = "direct"
ALGORITHM_IM2COL_BLAS = "im2col_blas"
ALGORITHM_REFERENCE = "reference"


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
    max_vector_width=1,
)

DIALECTS = {d.name: d for d in (OPENCL, CUDA)}


BUFFER_ARGS = ("input", "weight", "bias", "output", "scratch")


@dataclass(frozen=True)
class KernelArg:
    """One kernel argument: a buffer (input, weight, bias, output or the im2col scratch) or an
    int whose value is fixed by the ConvSpec and params."""

    name: str
    kind: str  # one of BUFFER_ARGS, or "int"
    value: int = 0


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel: its text, entry point, arguments in order and the launch geometry for
    one ConvSpec. Backends bind `args` and export writes them: one description for both.

    global_size counts work-items (OpenCL convention); local_size None lets the runtime choose.
    """

    text: str
    entry: str
    dialect: str
    global_size: tuple[int, int, int]
    local_size: tuple[int, int, int] | None
    args: tuple[KernelArg, ...] = ()

    @property
    def source_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


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


def template_hash() -> str:
    """Hash of every template file: part of any key whose answer depends on the generated code."""
    digest = hashlib.sha256()
    for path in sorted(template_dir().rglob("*.j2")):
        digest.update(path.relative_to(template_dir()).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _ints(**values: int) -> tuple[KernelArg, ...]:
    return tuple(KernelArg(name, "int", int(value)) for name, value in values.items())


def _geometry(spec: ConvSpec) -> tuple[KernelArg, ...]:
    return _ints(SH=spec.stride[0], SW=spec.stride[1], PH=spec.padding[0], PW=spec.padding[1],
                 DH=spec.dilation[0], DW=spec.dilation[1])


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_gemm_n(spec: ConvSpec, params: GemmParams) -> int:
    """N rounded up to whole NWG tiles: the im2col matrix's row length (zeros past N)."""
    return _ceil_to(spec.gemm_n, params.NWG)


def im2col_scratch_bytes(spec: ConvSpec, params: GemmParams) -> int:
    """Bytes of the padded im2col matrix the GEMM reads."""
    return spec.groups * spec.gemm_k * padded_gemm_n(spec, params) * spec.itemsize


def render_im2col(spec: ConvSpec, params: GemmParams, dialect: Dialect = OPENCL) -> KernelSource:
    """The im2col kernel writing the (padded) layout the GEMM with these params reads."""
    text = _environment().get_template("shared/im2col.j2").render(
        dialect=dialect, entry="im2col", b_transposed=params.B_TRANSPOSED, whole_rows=params.IM2COL_ROWS
    )
    ldn, crs = padded_gemm_n(spec, params), spec.gemm_k
    if params.IM2COL_ROWS and not params.B_TRANSPOSED:
        dims = (spec.n * spec.p + 1, crs)  # one more row index: the zero padding past N*P*Q
    elif params.IM2COL_ROWS:
        dims = (ldn, 1)
    else:
        dims = (crs, ldn) if params.B_TRANSPOSED else (ldn, crs)
    args = (KernelArg("x", "input"), KernelArg("cols", "scratch"),
            *_ints(C=spec.c, H=spec.h, W=spec.w, Cg=spec.c_per_group, R=spec.r, S=spec.s, P=spec.p, Q=spec.q),
            *_geometry(spec), *_ints(NPQ=spec.gemm_n, CRS=spec.gemm_k, LDN=ldn))
    return KernelSource(text, "im2col", dialect.name, (dims[0], dims[1], spec.groups), None, args)


def render_gemm(spec: ConvSpec, params: GemmParams, dialect: Dialect = OPENCL) -> KernelSource:
    """The tiled GEMM for these (already validated) params, launched over every group."""
    text = _environment().get_template("shared/gemm.j2").render(
        dialect=dialect, entry="gemm_conv", params=params.as_dict(), param_docs=GEMM_PARAMS
    )
    local_n, local_m = params.local_size
    global_size = (
        padded_gemm_n(spec, params) // params.WPTN,
        _ceil_to(spec.gemm_m, params.MWG) // params.WPTM,
        spec.groups,
    )
    args = (KernelArg("A", "weight"), KernelArg("B", "scratch"), KernelArg("bias", "bias"), KernelArg("out", "output"),
            *_ints(has_bias=int(spec.bias), M=spec.gemm_m, N=spec.gemm_n, K=spec.gemm_k, PQ=spec.p * spec.q,
                   G=spec.groups, LDN=padded_gemm_n(spec, params)))
    return KernelSource(text, "gemm_conv", dialect.name, global_size, (local_n, local_m, 1), args)


def render_direct(spec: ConvSpec, dialect: Dialect = OPENCL) -> KernelSource:
    """The naive direct kernel: one work-item per output element."""
    text = _environment().get_template("shared/direct.j2").render(dialect=dialect, entry="direct_conv")
    args = (KernelArg("x", "input"), KernelArg("wt", "weight"), KernelArg("bias", "bias"), KernelArg("out", "output"),
            *_ints(has_bias=int(spec.bias), C=spec.c, H=spec.h, W=spec.w, K=spec.k, Cg=spec.c_per_group,
                   Kg=spec.k_per_group, R=spec.r, S=spec.s, P=spec.p, Q=spec.q), *_geometry(spec))
    return KernelSource(text, "direct_conv", dialect.name, (spec.q, spec.p, spec.n * spec.k), None, args)
