"""Export tuned kernels as standalone sources: per layer the rendered kernels with the tuned
params baked in, a manifest.json and a C header describing how to launch them, and optionally
reference data to check a C/C++ port against. Written to a temporary directory and renamed into
place, so an interrupted export leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from autoconv.backends.base import DeviceInfo
from autoconv.errors import AutoconvError
from autoconv.plan import Plan
from autoconv.render import (
    BUFFER_ARGS,
    CUDA,
    OPENCL,
    Dialect,
    KernelSource,
    im2col_scratch_bytes,
    render_gemm,
    render_im2col,
    template_hash,
)
from autoconv.spec import ConvSpec

MANIFEST = "manifest.json"
HEADER = "autoconv_kernels.h"
MANIFEST_VERSION = 1


class ExportError(AutoconvError, RuntimeError):
    """The export cannot be written (the message names the path and why)."""


@dataclass(frozen=True)
class ExportEntry:
    """One layer to export: its name, shape and the plan chosen for it (tuned or fallback)."""

    name: str
    spec: ConvSpec
    plan: Plan
    tuned: bool
    note: str = ""


def dialect_for(device: DeviceInfo) -> Dialect:
    return CUDA if device.backend == "cuda" else OPENCL


def _file_stem(entry: ExportEntry) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in entry.name)
    return f"{safe}__{entry.spec.key()}"


def _comment_header(entry: ExportEntry, device: DeviceInfo, source: KernelSource, version: str) -> str:
    params = " ".join(f"{k}={v}" for k, v in entry.plan.gemm.as_dict().items()) if entry.plan.gemm else "-"
    lines = [
        f"autoconv {version} export: {source.entry} for layer {entry.name}",
        f"layer   {entry.spec} ({entry.spec.key()})",
        f"device  {device.name} ({device.platform}, driver {device.driver})",
        f"params  {params}",
        f"plan    {entry.plan.source}{'' if entry.tuned else ' (not tuned for this device: fallback plan)'}",
        f"templates {template_hash()}; launch: see manifest.json / {HEADER}",
    ]
    return "/*\n" + "".join(f" * {line}\n" for line in lines) + " */\n"


def _sources(entry: ExportEntry, dialect: Dialect) -> list[KernelSource]:
    if entry.plan.gemm is None:
        raise ExportError(f"{entry.name}: plan {entry.plan.algorithm!r} has no generated kernels to export")
    return [render_im2col(entry.spec, entry.plan.gemm, dialect), render_gemm(entry.spec, entry.plan.gemm, dialect)]


def _launch_local(source: KernelSource, dialect: Dialect) -> tuple[int, int, int] | None:
    if source.local_size is not None or dialect is OPENCL:
        return source.local_size
    return (256, 1, 1)  # CUDA needs a block size; the kernels guard every index they are given


def _layer_manifest(entry: ExportEntry, device: DeviceInfo, dialect: Dialect, version: str,
                    reference: bool) -> tuple[dict, dict[str, str]]:
    spec, stem = entry.spec, _file_stem(entry)
    files: dict[str, str] = {}
    kernels = []
    for source in _sources(entry, dialect):
        name = f"{stem}.{source.entry}{dialect.file_suffix}"
        files[name] = _comment_header(entry, device, source, version) + source.text
        local = _launch_local(source, dialect)
        kernels.append({
            "file": name, "entry": source.entry, "global_size": list(source.global_size),
            "local_size": list(local) if local is not None else None,
            "args": [{"name": a.name, "kind": a.kind, **({"value": a.value} if a.kind == "int" else {})}
                     for a in source.args],
        })
    itemsize = spec.itemsize
    layer = {
        "name": entry.name, "key": spec.key(),
        "shape": {"n": spec.n, "c": spec.c, "h": spec.h, "w": spec.w, "k": spec.k, "r": spec.r, "s": spec.s,
                  "stride": list(spec.stride), "padding": list(spec.padding), "dilation": list(spec.dilation),
                  "groups": spec.groups, "bias": spec.bias, "dtype": spec.dtype, "layout": spec.layout,
                  "p": spec.p, "q": spec.q},
        "tuned": entry.tuned, "plan_source": entry.plan.source, "note": entry.note,
        "params": entry.plan.gemm.as_dict() if entry.plan.gemm else None,
        "buffers": {"input": spec.input_bytes, "weight": int(np.prod(spec.weight_shape)) * itemsize,
                    "bias": spec.k * itemsize, "output": int(np.prod(spec.output_shape)) * itemsize,
                    "scratch": im2col_scratch_bytes(spec, entry.plan.gemm)},
        "kernels": kernels,
        "reference": {kind: f"reference/{stem}.{kind}.f32" for kind in ("input", "weight", "bias", "expected")
                      if kind != "bias" or spec.bias} if reference else None,
    }
    return layer, files


def _c_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable ASCII is a valid C string literal


def _header(manifest: dict) -> str:
    kinds = ("int", *BUFFER_ARGS)
    max_args = max((len(k["args"]) for layer in manifest["layers"] for k in layer["kernels"]), default=1)
    max_kernels = max((len(layer["kernels"]) for layer in manifest["layers"]), default=1)
    out = [
        f"/* autoconv {manifest['autoconv_version']} export for {manifest['device']['name']}: "
        "the launch description of every exported kernel (the same data as manifest.json). */",
        "#ifndef AUTOCONV_KERNELS_H", "#define AUTOCONV_KERNELS_H", "", "#include <stddef.h>", "",
        "enum autoconv_arg_kind { " + ", ".join(f"AUTOCONV_ARG_{k.upper()} = {i}" for i, k in enumerate(kinds)) + " };",
        f"#define AUTOCONV_MAX_ARGS {max_args}", f"#define AUTOCONV_MAX_KERNELS {max_kernels}",
        f"#define AUTOCONV_NUM_LAYERS {len(manifest['layers'])}", "",
        "typedef struct { const char *name; int kind; int value; } autoconv_arg;",
        "typedef struct {",
        "    const char *file;          /* kernel source, relative to the export directory */",
        "    const char *entry;         /* kernel function name */",
        "    size_t global_size[3];     /* work-items per dimension (OpenCL convention) */",
        "    size_t local_size[3];      /* work-group size; all zero: let the runtime choose */",
        "    int num_args;",
        "    autoconv_arg args[AUTOCONV_MAX_ARGS];",
        "} autoconv_kernel;",
        "typedef struct {",
        "    const char *name;",
        "    const char *key;",
        "    int n, c, h, w, k, r, s, p, q, groups, has_bias;",
        "    size_t input_bytes, weight_bytes, bias_bytes, output_bytes, scratch_bytes;",
        "    const char *reference_input, *reference_weight, *reference_bias, *reference_expected; /* NULL: none */",
        "    int num_kernels;           /* launched in this order on one in-order queue */",
        "    autoconv_kernel kernels[AUTOCONV_MAX_KERNELS];",
        "} autoconv_layer;", "",
        "static const autoconv_layer autoconv_layers[AUTOCONV_NUM_LAYERS] = {",
    ]
    for layer in manifest["layers"]:
        shape, buffers, ref = layer["shape"], layer["buffers"], layer["reference"] or {}
        kernels = []
        for k in layer["kernels"]:
            args = ", ".join(f"{{{_c_string(a['name'])}, AUTOCONV_ARG_{a['kind'].upper()}, {a.get('value', 0)}}}"
                             for a in k["args"])
            local = k["local_size"] or [0, 0, 0]
            kernels.append(f"        {{{_c_string(k['file'])}, {_c_string(k['entry'])}, "
                           f"{{{', '.join(map(str, k['global_size']))}}}, {{{', '.join(map(str, local))}}}, "
                           f"{len(k['args'])}, {{{args}}}}}")
        refs = ", ".join(_c_string(ref[kind]) if kind in ref else "NULL" for kind in ("input", "weight", "bias", "expected"))
        out.append(
            f"    {{{_c_string(layer['name'])}, {_c_string(layer['key'])}, "
            f"{shape['n']}, {shape['c']}, {shape['h']}, {shape['w']}, {shape['k']}, {shape['r']}, {shape['s']}, "
            f"{shape['p']}, {shape['q']}, {shape['groups']}, {int(shape['bias'])},\n"
            f"     {buffers['input']}, {buffers['weight']}, {buffers['bias']}, {buffers['output']}, {buffers['scratch']},\n"
            f"     {refs},\n     {len(kernels)}, {{\n" + ",\n".join(kernels) + "}},")
    out += ["};", "", "#endif /* AUTOCONV_KERNELS_H */", ""]
    return "\n".join(out)


def _reference_files(entry: ExportEntry, stem: str) -> dict[str, bytes]:
    from autoconv.compare import random_operands, reference_output

    operands = random_operands(entry.spec, seed=0)
    x, w, b = operands
    files = {f"reference/{stem}.input.f32": x.astype("<f4").tobytes(),
             f"reference/{stem}.weight.f32": w.astype("<f4").tobytes(),
             f"reference/{stem}.expected.f32": reference_output(entry.spec, operands).astype("<f4").tobytes()}
    if b is not None:
        files[f"reference/{stem}.bias.f32"] = b.astype("<f4").tobytes()
    return files


def export(entries: Iterable[ExportEntry], device: DeviceInfo, out_dir: str | Path, *, reference: bool = False) -> dict:
    """Write the export to out_dir (replacing an earlier autoconv export there) and return the
    manifest. Deterministic: the same entries give byte-identical files."""
    from autoconv import __version__

    entries = sorted(entries, key=lambda e: (e.name, e.spec.key()))
    if not entries:
        raise ExportError("nothing to export: no layers selected")
    dialect = dialect_for(device)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ExportError(f"--out: {out} exists and is not an earlier autoconv export; choose a new or empty directory")
    manifest = {
        "format": "autoconv-export", "version": MANIFEST_VERSION, "autoconv_version": __version__,
        "template_hash": template_hash(), "language": dialect.name,
        "device": {"fingerprint": device.fingerprint(), "name": device.name, "platform": device.platform,
                   "driver": device.driver, "backend": device.backend},
        "layers": [],
    }
    files: dict[str, str | bytes] = {}
    for entry in entries:
        layer, sources = _layer_manifest(entry, device, dialect, __version__, reference)
        manifest["layers"].append(layer)
        files.update(sources)
        if reference:
            files.update(_reference_files(entry, _file_stem(entry)))
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    files[HEADER] = _header(manifest)

    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ExportError(f"--out: cannot write in {parent}: {exc.strerror or exc}") from None
    try:
        for name, content in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="ascii")
        if out.exists():
            retired = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, retired)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
