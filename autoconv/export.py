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
from typing import Any, Iterable, Mapping


from autoconv.algorithms import get_algorithm
from autoconv.device import DeviceInfo
from autoconv.errors import AutoconvError
from autoconv.layouts import layout_block
from autoconv.plan import Plan
from autoconv.render import BUFFER_ARGS, CUDA, OPENCL, Dialect, KernelSource, source_text, template_hash
from autoconv.settings import current_umask
from autoconv.spec import ConvSpec

MANIFEST = "manifest.json"
HEADER = "autoconv_kernels.h"
MANIFEST_VERSION = 3  # 2: a per-layer checksum ties the header to the kernel files; 3: fused epilogues
MAX_MANIFEST_BYTES = 64 * 2**20
REFERENCE_KINDS = ("input", "weight", "bias", "residual", "expected")
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


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
    safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_" for ch in entry.name)
    return f"{safe}__{entry.spec.key()}"


def _comment_header(entry: ExportEntry, device: DeviceInfo, source: KernelSource, version: str) -> str:
    params = entry.plan.params.describe() or "-"
    lines = [
        f"autoconv {version} export: {source.entry} for layer {entry.name}",
        f"layer   {entry.spec} ({entry.spec.key()})",
        f"device  {device.name} ({device.platform}, driver {device.driver})",
        f"algorithm {entry.plan.algorithm}",
        f"params  {params}",
        f"plan    {entry.plan.source}{'' if entry.tuned else ' (not tuned for this device: fallback plan)'}",
        f"templates {template_hash()}; launch: see manifest.json / {HEADER}",
    ]
    return "/*\n" + "".join(f" * {source_text(line)}\n" for line in lines) + " */\n"


def _sources(entry: ExportEntry, dialect: Dialect) -> list[KernelSource]:
    algorithm = get_algorithm(entry.plan.algorithm)
    if not algorithm.device_kernels:
        raise ExportError(f"{entry.name}: plan {entry.plan.algorithm!r} has no generated kernels to export")
    return algorithm.kernels(entry.spec, entry.plan.params, dialect)


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
            # Depends on the weights alone (a filter transform): a caller may run it once per weights.
            "once_per_weights": source.once_per_weights,
            "args": [{"name": a.name, "kind": a.kind, **({"value": a.value} if a.kind == "int" else {})}
                     for a in source.args],
        })
    itemsize = spec.itemsize
    layer = {
        "name": entry.name, "key": spec.key(),
        "shape": {"n": spec.n, "c": spec.c, "h": spec.h, "w": spec.w, "k": spec.k, "r": spec.r, "s": spec.s,
                  "stride": list(spec.stride), "padding": list(spec.padding), "padding_end": list(spec.bottom_right),
                  "dilation": list(spec.dilation),
                  "groups": spec.groups, "bias": spec.bias, "dtype": spec.dtype, "layout": spec.layout,
                  "activation": spec.activation, "residual": spec.residual, "p": spec.p, "q": spec.q},
        "tuned": entry.tuned, "plan_source": entry.plan.source, "note": entry.note,
        "algorithm": entry.plan.algorithm, "params": entry.plan.params.as_dict(),
        "buffers": {"input": spec.input_bytes, "weight": spec.weight_bytes, "bias": spec.k * itemsize,
                    "output": spec.output_bytes,
                    "scratch": get_algorithm(entry.plan.algorithm).scratch_bytes(spec, entry.plan.params),
                    # The fused epilogue's residual (the output's shape), read by the kernel that
                    # writes the output; 0 for a layer without one.
                    "residual": spec.output_bytes if spec.residual else 0},
        "kernels": kernels,
        "reference": {kind: f"reference/{stem}.{kind}.f32" for kind in REFERENCE_KINDS
                      if (kind != "bias" or spec.bias) and (kind != "residual" or spec.residual)} if reference else None,
    }
    return layer, files


def fnv1a64(data: bytes, state: int = FNV_OFFSET) -> int:
    """64-bit FNV-1a: a checksum small enough to recompute in the plain C example."""
    for byte in data:
        state = ((state ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return state


def layer_description(layer: dict) -> str:
    """The launch description of a layer as text, exactly as examples/c/run_layer.c formats it
    from autoconv_kernels.h: the checksum covers it and the kernel files' bytes."""
    shape, buffers = layer["shape"], layer["buffers"]
    parts = [f"{layer['key']}|{shape['n']} {shape['c']} {shape['h']} {shape['w']} {shape['k']} {shape['r']} "
             f"{shape['s']} {shape['p']} {shape['q']} {shape['groups']} {int(shape['bias'])}|{buffers['input']} "
             f"{buffers['weight']} {buffers['bias']} {buffers['output']} {buffers['scratch']} {buffers['residual']}|"
             f"{len(layer['kernels'])}"]
    for kernel in layer["kernels"]:
        local = kernel["local_size"] or [0, 0, 0]
        parts.append(f"|{kernel['file']}|{kernel['entry']}|{' '.join(map(str, kernel['global_size']))}|"
                     f"{' '.join(map(str, local))}|{len(kernel['args'])}")
        kinds = ("int", *BUFFER_ARGS)
        parts += [f";{arg['name']}:{kinds.index(arg['kind'])}:{arg.get('value', 0)}" for arg in kernel["args"]]
    return "".join(parts)


def layer_checksum(layer: dict[str, Any], files: Mapping[str, str | bytes]) -> str:
    state = fnv1a64(layer_description(layer).encode("ascii"))
    for kernel in layer["kernels"]:
        content = files[kernel["file"]]
        state = fnv1a64(content.encode("ascii") if isinstance(content, str) else content, state)
    return f"{state:016x}"


def _c_string(text: str) -> str:
    return f'"{source_text(text)}"'  # the manifest keeps the exact text


def _header(manifest: dict) -> str:
    kinds = ("int", *BUFFER_ARGS)
    max_args = max((len(k["args"]) for layer in manifest["layers"] for k in layer["kernels"]), default=1)
    max_kernels = max((len(layer["kernels"]) for layer in manifest["layers"]), default=1)
    out = [
        f"/* autoconv {source_text(manifest['autoconv_version'])} export for {source_text(manifest['device']['name'])}: "
        "the launch description of every exported kernel (the same data as manifest.json). */",
        "#ifndef AUTOCONV_KERNELS_H", "#define AUTOCONV_KERNELS_H", "", "#include <stddef.h>", "",
        f"#define AUTOCONV_EXPORT_HASH {_c_string(manifest['export_hash'])}",
        "enum autoconv_arg_kind { " + ", ".join(f"AUTOCONV_ARG_{k.upper()} = {i}" for i, k in enumerate(kinds)) + " };",
        f"#define AUTOCONV_NUM_ARG_KINDS {len(kinds)}",
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
        "    const char *layout;        /* of the input, output and residual: NCHW, or NCHW{b}c (b channels",
        "                                  innermost, ceil(c/b) blocks, the padding channels zero) */",
        "    int block;                 /* b of NCHW{b}c; 1 for NCHW */",
        "    size_t input_bytes, weight_bytes, bias_bytes, output_bytes, scratch_bytes;",
        "    size_t residual_bytes;     /* the fused epilogue's residual operand (output-shaped); 0: none */",
        "    const char *reference_input, *reference_weight, *reference_bias, *reference_residual,",
        "               *reference_expected; /* NULL: none */",
        "    int num_kernels;           /* launched in this order on one in-order queue */",
        "    unsigned long long checksum; /* FNV-1a 64 of the description and kernel files (run_layer.c) */",
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
        refs = ", ".join(_c_string(ref[kind]) if kind in ref else "NULL" for kind in REFERENCE_KINDS)
        out.append(
            f"    {{{_c_string(layer['name'])}, {_c_string(layer['key'])}, "
            f"{shape['n']}, {shape['c']}, {shape['h']}, {shape['w']}, {shape['k']}, {shape['r']}, {shape['s']}, "
            f"{shape['p']}, {shape['q']}, {shape['groups']}, {int(shape['bias'])}, {_c_string(shape['layout'])}, "
            f"{layout_block(shape['layout'])},\n"
            f"     {buffers['input']}, {buffers['weight']}, {buffers['bias']}, {buffers['output']}, {buffers['scratch']},\n"
            f"     {buffers['residual']},\n"
            f"     {refs},\n     {len(kernels)}, 0x{layer['checksum']}ULL, {{\n" + ",\n".join(kernels) + "}},")
    out += ["};", "", "#endif /* AUTOCONV_KERNELS_H */", ""]
    return "\n".join(out)


def _reference_files(entry: ExportEntry, stem: str) -> dict[str, bytes]:
    from autoconv.tuning.verify import random_operands, reference_output

    operands = random_operands(entry.spec, seed=0)
    x, w, b, residual = (*operands, None)[:4]
    files = {f"reference/{stem}.input.f32": x.astype("<f4").tobytes(),
             f"reference/{stem}.weight.f32": w.astype("<f4").tobytes(),
             f"reference/{stem}.expected.f32": reference_output(entry.spec, operands).astype("<f4").tobytes()}
    if b is not None:
        files[f"reference/{stem}.bias.f32"] = b.astype("<f4").tobytes()
    if residual is not None:
        files[f"reference/{stem}.residual.f32"] = residual.astype("<f4").tobytes()
    return files


def _export_files(manifest: dict) -> set[str]:
    """Every file an export wrote, from its manifest."""
    names = {MANIFEST, HEADER}
    for layer in manifest.get("layers", []):
        names.update(str(kernel["file"]) for kernel in layer.get("kernels", []))
        names.update(str(path) for path in (layer.get("reference") or {}).values())
    return names


def _check_replaceable(out: Path) -> None:
    """Refuse an --out that is anything but absent, empty, or exactly an earlier autoconv export:
    every file in it named by its manifest. A directory the user put other files in is never
    replaced (nothing a user owns is deleted)."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"--out: {out} exists and is not a directory; choose a new or empty directory")
    present = {path.relative_to(out).as_posix(): path for path in out.rglob("*")}
    if not present:
        return
    refusal = f"--out: {out} is not an earlier autoconv export; choose a new or empty directory"
    try:
        manifest_path = out / MANIFEST
        if manifest_path.is_symlink() or manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ExportError(refusal)
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != "autoconv-export":
            raise ExportError(refusal)
        ours = _export_files(manifest)
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError):
        raise ExportError(refusal) from None
    foreign = sorted(name for name, path in present.items()
                     if path.is_symlink() or (path.is_dir() and name != "reference")
                     or (path.is_file() and name not in ours))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"--out: {out} holds files that are not part of an earlier autoconv export ({shown}); "
                          "choose a new or empty directory")
    edited = _edited_files(out, manifest)
    if edited:
        shown = ", ".join(edited[:3]) + (f" and {len(edited) - 3} more" if len(edited) > 3 else "")
        raise ExportError(f"--out: the earlier export in {out} was edited since it was written ({shown}); "
                          "choose a new or empty directory, or move your edits away")


def _edited_files(out: Path, manifest: dict) -> list[str]:
    """Files of an earlier export whose contents are no longer what it wrote: a layer's kernel
    files against its checksum, the header against the one its manifest gives."""
    edited = []
    try:
        for layer in manifest["layers"]:
            names = [kernel["file"] for kernel in layer["kernels"]]
            on_disk = {name: (out / name).read_bytes() for name in names if (out / name).is_file()}
            if len(on_disk) != len(names) or layer_checksum(layer, on_disk) != layer["checksum"]:
                edited += [name for name in names if name in on_disk] or names
        header = out / HEADER
        if header.is_file() and header.read_bytes() != _header(manifest).encode("ascii"):
            edited.append(HEADER)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeError):
        raise ExportError(f"--out: {out} holds an earlier export this version cannot check; choose a new or empty "
                          "directory") from None
    return sorted(set(edited))


def export(entries: Iterable[ExportEntry], device: DeviceInfo, out_dir: str | Path, *, reference: bool = False) -> dict:
    """Write the export to out_dir (replacing an earlier autoconv export there) and return the
    manifest. Deterministic: the same entries give byte-identical files."""
    from autoconv import __version__

    entries = sorted(entries, key=lambda e: (e.name, e.spec.key()))
    if not entries:
        raise ExportError("nothing to export: no layers selected")
    dialect = dialect_for(device)
    out = Path(out_dir)
    _check_replaceable(out)
    manifest: dict[str, Any] = {
        "format": "autoconv-export", "version": MANIFEST_VERSION, "autoconv_version": __version__,
        "template_hash": template_hash(), "language": dialect.name,
        "device": {"fingerprint": device.fingerprint(), "name": device.name, "platform": device.platform,
                   "driver": device.driver, "backend": device.backend},
        "layers": [],
    }
    files: dict[str, str | bytes] = {}
    for entry in entries:
        layer, sources = _layer_manifest(entry, device, dialect, __version__, reference)
        layer["checksum"] = layer_checksum(layer, sources)
        manifest["layers"].append(layer)
        files.update(sources)
        if reference:
            files.update(_reference_files(entry, _file_stem(entry)))
    manifest["export_hash"] = f"{fnv1a64(''.join(layer['checksum'] for layer in manifest['layers']).encode()):016x}"
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    files[HEADER] = _header(manifest)

    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 is for the staging; the export gets the user's mode
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
            _check_replaceable(out)  # again: the directory may have changed while the files were rendered
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
