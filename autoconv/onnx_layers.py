"""Conv layer shapes read from an ONNX graph (the optional `onnx` extra): what `--onnx` tunes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoconv.errors import BackendUnavailableError, InvalidSpecError
from autoconv.layers import NamedLayer
from autoconv.spec import ConvSpec


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("--onnx needs the onnx package: pip install onnx (autoconv's [onnx] extra)") from None
    return onnx


def _dims(value_type: Any) -> list[int | None]:
    shape = value_type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    return total // 2, total - total // 2


def _ints(attrs: dict[str, Any], name: str, count: int, default: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """An ints attribute of a 2-D Conv, checked: `count` values, each at least `minimum`."""
    raw = attrs.get(name, default)
    try:
        values = tuple(int(v) for v in raw)
    except (TypeError, ValueError):
        raise InvalidSpecError(f"{name} must be a list of ints, got {raw!r}") from None
    if len(values) != count:
        raise InvalidSpecError(f"{name} must have {count} values for a 2-D Conv, got {list(values)}")
    if min(values) < minimum:
        raise InvalidSpecError(f"{name} must be at least {minimum}, got {list(values)}")
    return values


def conv_geometry(attrs: dict[str, Any], x_shape: list, w_shape: list) -> tuple:
    """(kernel, strides, dilations, ((top, bottom), (left, right))) from a Conv node's attributes."""
    kernel = (int(w_shape[2]), int(w_shape[3]))
    if "kernel_shape" in attrs and _ints(attrs, "kernel_shape", 2, kernel, 1) != kernel:
        raise InvalidSpecError(f"kernel_shape {list(attrs['kernel_shape'])} does not match the weight's {list(kernel)}")
    strides = _ints(attrs, "strides", 2, (1, 1), 1)
    dilations = _ints(attrs, "dilations", 2, (1, 1), 1)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode(errors="replace") if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_h = _same_padding(int(x_shape[2]), kernel[0], strides[0], dilations[0])
        pads_w = _same_padding(int(x_shape[3]), kernel[1], strides[1], dilations[1])
        if auto_pad == "SAME_LOWER":  # the odd extra pixel goes first
            pads_h, pads_w = pads_h[::-1], pads_w[::-1]
        return kernel, strides, dilations, (pads_h, pads_w)
    if auto_pad == "VALID":
        return kernel, strides, dilations, ((0, 0), (0, 0))
    if auto_pad not in ("NOTSET", ""):
        raise InvalidSpecError(f"auto_pad {auto_pad!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    pads = _ints(attrs, "pads", 4, (0, 0, 0, 0), 0)
    return kernel, strides, dilations, ((pads[0], pads[2]), (pads[1], pads[3]))


def _fused_epilogues(path: Path) -> dict[str, tuple[str | None, bool]]:
    """Conv output name -> (activation, residual) that `autoconv.onnx.load` fuses into it (its
    BatchNormalization folded in gives it a bias); {} where the graph cannot be prepared."""
    from autoconv.errors import AutoconvError
    from autoconv.graph.prepare import ConvStep, prepare

    try:
        steps = prepare(path).steps
    except AutoconvError:
        return {}
    return {s.conv_output: (s.activation, s.residual is not None) for s in steps if isinstance(s, ConvStep)}


def onnx_layers(path: str | Path, batch: int | None = None) -> tuple[list[NamedLayer], list[str]]:
    """Every Conv node of a model with static spatial shapes, as NamedLayers (batch overrides n;
    a symbolic batch dimension becomes 1 unless a batch is given), and why any others were skipped.
    Each carries the epilogue the model runner fuses into it (bias, residual, activation), so a
    tuned layer is the one `autoconv.onnx.load` serves."""
    onnx = _onnx()
    path = Path(path)
    if path.is_dir():
        raise InvalidSpecError(f"--onnx: {path} is a directory, not an ONNX model file")
    if not path.is_file():
        raise InvalidSpecError(f"--onnx: {path} does not exist")
    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception as exc:  # noqa: BLE001 - onnx raises many kinds for a bad file
        raise InvalidSpecError(f"--onnx: {path} is not a readable ONNX model: {exc}") from None
    graph = model.graph
    shapes: dict[str, list[int | None]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shapes[value.name] = _dims(value.type)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    fused = _fused_epilogues(path)
    layers: list[NamedLayer] = []
    problems: list[str] = []
    for index, node in enumerate(n for n in graph.node if n.op_type == "Conv"):
        name = node.name or f"conv{index}"
        x_shape, w_shape = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not x_shape or not w_shape or len(x_shape) != 4 or len(w_shape) != 4:
            problems.append(f"{name}: not a 2-D conv with known input and weight shapes")
            continue
        n: int = batch if batch is not None else (x_shape[0] or 1)
        if any(d is None for d in x_shape[1:]) or any(d is None for d in w_shape):
            problems.append(f"{name}: symbolic spatial or channel dimensions")
            continue
        x_dims, w_dims = [int(d or 0) for d in x_shape], [int(d or 0) for d in w_shape]  # no None left
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            kernel, strides, dilations, begin_end = conv_geometry(attrs, x_dims, w_dims)
        except InvalidSpecError as exc:
            problems.append(f"{name}: {exc}")
            continue
        try:
            spec = ConvSpec(n=int(n), c=x_dims[1], h=x_dims[2], w=x_dims[3], k=w_dims[0],
                            r=kernel[0], s=kernel[1], stride=strides, padding=(begin_end[0][0], begin_end[1][0]),
                            padding_end=(begin_end[0][1], begin_end[1][1]),
                            dilation=dilations, groups=int(attrs.get("group", 1)), bias=len(node.input) > 2 and bool(node.input[2]))
        except (InvalidSpecError, TypeError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        if node.output[0] in fused:  # the epilogue the model runner serves it with
            activation, residual = fused[node.output[0]]
            spec = spec.replace(bias=True, activation=activation or "none", residual=residual)
        layers.append(NamedLayer(path.stem, name, spec))
    if not layers:
        detail = "; ".join(problems) if problems else "it has no Conv nodes"
        raise InvalidSpecError(f"--onnx: no usable Conv layer in {path} ({detail})")
    return layers, problems
