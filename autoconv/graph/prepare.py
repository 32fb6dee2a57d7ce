"""An ONNX CNN prepared once into steps over named tensors: checked with onnx.checker, shapes
inferred, initializer-only subgraphs folded into constants (the zoo graphs compute their weights
with ConstantOfShape), and each Conv fused as onnxruntime fuses it: a following
BatchNormalization folded into its weights and bias, an Add/Sum with another tensor as its
residual, then Relu or Clip(0, 6) as its activation. What is left is a list of steps, each a conv
layer, a numpy operator (autoconv/graph/ops.py) or onnx.reference's implementation.

What cannot run is refused here, in one line naming the node: a dimension shape inference cannot
resolve, a tensor that is not float32, a training-mode node."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autoconv.errors import InvalidSpecError
from autoconv.graph.ops import OPS, SPLIT
from autoconv.onnx_layers import conv_geometry


class UnsupportedModelError(InvalidSpecError):
    """A model, or one of its nodes, that autoconv cannot run (the message names the node)."""


def onnx_module() -> Any:
    try:
        import onnx
    except ImportError:
        raise UnsupportedModelError("running an ONNX model needs the onnx package: pip install onnx "
                                    "(autoconv's [onnx] extra)") from None
    return onnx


@dataclass
class ConvStep:
    """A Conv with its fused epilogue: weights and bias already folded with the BatchNormalization."""

    name: str
    input: str
    output: str
    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    dilation: tuple[int, int]
    groups: int
    activation: str | None = None
    residual: str | None = None
    fused: list[str] = field(default_factory=list)  # the op types folded into it, in order
    conv_output: str = ""  # the Conv node's own output (before what is fused into it)


@dataclass
class OpStep:
    """A node run by a numpy operator, or by onnx.reference where autoconv has none."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    node: Any  # the NodeProto (onnx.reference runs it)
    native: bool
    # A BatchNormalization of constant statistics that follows no convolution takes the Relu or
    # Clip(0, 6) after it (its output is then that node's): one pass over the tensor, not two.
    activation: str | None = None
    fused: list[str] = field(default_factory=list)  # the op types folded into it, in order
    # That BatchNormalization as x * scale + shift per channel (float64), the folded Mul/Add included.
    affine: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class PreparedModel:
    inputs: list[tuple[str, tuple[int, ...]]]
    outputs: list[str]
    constants: dict[str, np.ndarray]
    steps: list[ConvStep | OpStep]
    opset: int
    opset_imports: list[Any] = field(default_factory=list)


def _node_label(node: Any, index: int) -> str:
    return node.name or f"{node.op_type} #{index} (output {node.output[0]!r})"


def _attrs(onnx: Any, node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def load_proto(model: Any) -> Any:
    """A path or ModelProto -> a ModelProto of its own (a caller's proto is never changed)."""
    onnx = onnx_module()
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise UnsupportedModelError(f"model: {path} is not a file")
        try:
            return onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - onnx raises many kinds for a bad file
            raise UnsupportedModelError(f"model: {path} is not a readable ONNX model: {exc}") from None
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    raise UnsupportedModelError(f"model: expected a path or an onnx.ModelProto, got {type(model).__name__}")


def reference_node(onnx: Any, node: Any, opset_imports: Any) -> Callable[[dict[str, Any]], list[Any]]:
    """onnx.reference's evaluation of one node at the model's opsets (a bare node would be read at
    the newest opset: an old Unsqueeze's `axes` attribute would be refused): feed -> outputs."""
    from onnx.reference import ReferenceEvaluator

    function = onnx.helper.make_function("autoconv.node", "node", [i for i in node.input if i],
                                         [o for o in node.output if o], [node], list(opset_imports))
    evaluator = ReferenceEvaluator(function)
    return lambda feed: list(evaluator.run(None, feed, attributes={}))


def with_batch(model: Any, batch: int) -> Any:
    """The model with every input's first dimension set to `batch`, its shapes inferred again; one
    line where the graph does not allow it (a Reshape to a fixed batch, say)."""
    onnx = onnx_module()
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise UnsupportedModelError(f"batch: expected a positive int, got {batch!r}")
    proto = load_proto(model)
    initializers = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.tensor_type.shape.dim:
            continue
        first = value.type.tensor_type.shape.dim[0]
        first.Clear()
        first.dim_value = batch
    del proto.graph.value_info[:]
    for value in proto.graph.output:
        if value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].Clear()
    proto.ir_version = max(proto.ir_version, 4)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"batch: the graph does not allow batch {batch}: "
                                    f"{str(exc).splitlines()[0]}") from None
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise UnsupportedModelError(f"batch: the graph does not allow batch {batch}: output {value.name!r} "
                                        f"keeps batch {dims[0].dim_value}")
    return proto


def _fold_constants(onnx: Any, proto: Any, constants: dict[str, np.ndarray]) -> list[Any]:
    """Evaluate every node whose inputs are all constants (onnx.reference); the rest, in order."""
    graph = proto.graph
    kept = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Constant" and not all(i == "" or i in constants for i in node.input):
            kept.append(node)
            continue
        try:
            values = reference_node(onnx, node, proto.opset_import)({i: constants[i] for i in node.input if i})
        except Exception as exc:  # noqa: BLE001 - the reference raises whatever the op raises
            raise UnsupportedModelError(f"node {_node_label(node, index)}: its constant inputs could not be folded: {exc}") from None
        constants.update({name: np.asarray(value) for name, value in zip([o for o in node.output if o], values)})
    return kept


def prepare(model: Any, input_shapes: dict[str, tuple[int, ...]] | None = None) -> PreparedModel:
    """A path or ModelProto -> a PreparedModel (see the module docstring)."""
    onnx = onnx_module()
    from onnx import numpy_helper

    proto = load_proto(model)
    graph = proto.graph
    # IR version 3 reads an initializer only where it is also a graph input; 4 drops that rule.
    proto.ir_version = max(proto.ir_version, 4)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in initializers]
    for value in real_inputs:
        dims = value.type.tensor_type.shape.dim
        wanted = (input_shapes or {}).get(value.name)
        if wanted is not None:
            if len(wanted) != len(dims):
                raise UnsupportedModelError(f"input_shapes[{value.name!r}]: expected {len(dims)} dimensions, "
                                            f"got {tuple(wanted)}")
            for dim, size in zip(dims, wanted):
                dim.Clear()
                dim.dim_value = int(size)
        unknown = [d.dim_param or "?" for d in dims if not d.HasField("dim_value")]
        if unknown:
            raise UnsupportedModelError(f"input {value.name!r}: dimension(s) {', '.join(repr(u) for u in unknown)} are not fixed; "
                                        f"give input_shapes={{{value.name!r}: (...)}}")
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise UnsupportedModelError(f"input {value.name!r}: only float32 inputs are supported, got "
                                        f"{onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)}")
    for index, node in enumerate(graph.node):
        training = node.input[2] if node.op_type == "Dropout" and len(node.input) > 2 else ""
        if int(_attrs(onnx, node).get("training_mode", 0)) or (training and bool(initializers.get(training, False))):
            raise UnsupportedModelError(f"node {_node_label(node, index)}: training-mode {node.op_type} is not supported "
                                        "(autoconv runs inference)")
    try:
        # Inferred first: a graph output without a declared shape (onnxruntime runs those) is then whole.
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(proto))
    except Exception as exc:  # noqa: BLE001 - ValidationError and friends
        raise UnsupportedModelError(f"model: onnx.checker refused it: {str(exc).splitlines()[0]}") from None

    constants = dict(initializers)
    kept = _fold_constants(onnx, proto, constants)
    del graph.node[:]
    graph.node.extend(kept)
    # Shape inference over the folded graph, the constants as initializers.
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"model: shape inference failed: {str(exc).splitlines()[0]}") from None
    graph = proto.graph
    types = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name or name not in types:
                continue
            tensor = types[name]
            if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL) and node.op_type != "Shape":
                raise UnsupportedModelError(
                    f"node {_node_label(node, index)}: output {name!r} is "
                    f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}; only float32 tensors are supported")
            if not tensor.HasField("shape") or any(not d.HasField("dim_value") for d in tensor.shape.dim):
                raise UnsupportedModelError(f"node {_node_label(node, index)}: the shape of {name!r} cannot be resolved "
                                            "by shape inference (a dynamic dimension)")
    steps = _fuse(onnx, graph, constants)
    return PreparedModel([(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in real_inputs],
                         [o.name for o in graph.output], constants, steps, opset, list(proto.opset_import))


def _fuse(onnx: Any, graph: Any, constants: dict[str, np.ndarray]) -> list[ConvStep | OpStep]:
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    graph_outputs = {o.name for o in graph.output}
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*graph.value_info, *graph.input, *graph.output]}
    absorbed: set[int] = set()
    placed: dict[int, ConvStep] = {}  # index of a group's last node -> the fused conv

    def sole_consumer(tensor: str) -> int | None:
        """The one node reading `tensor`, when nothing else (a graph output included) does."""
        readers = consumers.get(tensor, [])
        if len(readers) != 1 or tensor in graph_outputs or readers[0] in absorbed:
            return None  # (an absorbed reader already belongs to another conv's group)
        return readers[0]

    def channel_chain(tensor: str, channels: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The constant per-channel Mul and Add nodes after `tensor`, each the sole reader of the
        last (a BatchNormalization exported as its four ops, or its scale and shift after a plain
        one: DenseNet's Caffe2 graph): together x * multiply + add per channel, and their indices."""
        multiply, add, chain = np.ones(channels), np.zeros(channels), []
        nxt = sole_consumer(tensor)
        while nxt is not None and (factors := _channel_factors(nodes[nxt], tensor, constants, channels)):
            multiply, add = multiply * factors[0], add * factors[0] + factors[1]
            chain.append(nxt)
            tensor = nodes[nxt].output[0]
            nxt = sole_consumer(tensor)
        return multiply, add, chain

    for index, node in enumerate(nodes):
        if node.op_type != "Conv" or index in absorbed:
            continue
        attrs = _attrs(onnx, node)
        if node.input[1] not in constants or (len(node.input) > 2 and node.input[2] and node.input[2] not in constants):
            continue  # weights computed at run time: run by onnx.reference
        weight = constants[node.input[1]].astype(np.float64)
        if weight.ndim != 4:
            continue  # not a 2-D convolution
        bias = constants[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else None
        try:
            _, strides, dilations, pads = conv_geometry(attrs, list(shapes[node.input[0]]), list(weight.shape))
        except InvalidSpecError as exc:
            raise UnsupportedModelError(f"node {_node_label(node, index)}: {exc}") from None
        step = ConvStep(_node_label(node, index), node.input[0], node.output[0], weight, bias, strides, pads, dilations,
                        int(attrs.get("group", 1)), conv_output=node.output[0])
        last = index
        tensor = node.output[0]
        nxt = sole_consumer(tensor)
        if nxt is not None and nodes[nxt].op_type == "BatchNormalization" and nodes[nxt].input[0] == tensor \
                and all(i in constants for i in nodes[nxt].input[1:5]):
            factor, shift = _batch_norm_factors(onnx, nodes[nxt], constants)
            step.weight = step.weight * factor[:, None, None, None]
            step.bias = (step.bias if step.bias is not None else 0.0) * factor + shift
            step.fused.append("BatchNormalization")
            absorbed.add(nxt)
            last, tensor = nxt, nodes[nxt].output[0]
        multiply, add, chain = channel_chain(tensor, weight.shape[0])
        if chain:
            step.weight = step.weight * multiply[:, None, None, None]
            step.bias = (step.bias if step.bias is not None else 0.0) * multiply + add
            step.fused += [nodes[i].op_type for i in chain]
            absorbed.update(chain)
            last, tensor = chain[-1], nodes[chain[-1]].output[0]
        nxt = sole_consumer(tensor)
        if nxt is not None and nodes[nxt].op_type in ("Add", "Sum") and len(nodes[nxt].input) == 2:
            other = next((i for i in nodes[nxt].input if i != tensor), None)
            out_shape = shapes.get(nodes[nxt].output[0])
            if other is not None and other not in constants and shapes.get(other) == out_shape \
                    and shapes.get(tensor) == out_shape:
                step.residual = other
                step.fused.append(nodes[nxt].op_type)
                absorbed.add(nxt)
                last, tensor = nxt, nodes[nxt].output[0]
                nxt = sole_consumer(tensor)
        if nxt is not None:
            activation = _activation(onnx, nodes[nxt], constants)
            if activation is not None:
                step.activation = activation
                step.fused.append(nodes[nxt].op_type)
                absorbed.add(nxt)
                last, tensor = nxt, nodes[nxt].output[0]
        step.output = tensor
        step.weight = step.weight.astype(np.float32)
        step.bias = None if step.bias is None else np.asarray(step.bias, dtype=np.float32)
        absorbed.add(index)
        placed[last] = step

    # A BatchNormalization of constant statistics that follows no conv: a per-channel affine map,
    # with the constant per-channel Mul/Add and the activation after it.
    affines: dict[int, tuple[np.ndarray, np.ndarray, str | None, list[int]]] = {}
    for index, node in enumerate(nodes):
        shape = shapes.get(node.input[0], ()) if node.input else ()
        if node.op_type != "BatchNormalization" or index in absorbed or len(node.output) != 1 \
                or not all(name in constants for name in node.input[1:5]) or len(shape) != 4:
            continue
        factor, shift = _batch_norm_factors(onnx, node, constants)
        multiply, add, after = channel_chain(node.output[0], shape[1])
        factor, shift = factor * multiply, shift * multiply + add
        nxt = sole_consumer(nodes[after[-1]].output[0] if after else node.output[0])
        activation = None if nxt is None else _activation(onnx, nodes[nxt], constants)
        if nxt is not None and activation is not None:
            after.append(nxt)
        affines[index] = (factor, shift, activation, after)
        absorbed.update(after)

    steps: list[ConvStep | OpStep] = []
    for index, node in enumerate(nodes):
        if index in placed:
            steps.append(placed[index])
        if index in absorbed:
            continue
        op = OpStep(_node_label(node, index), node.op_type, list(node.input), list(node.output), _attrs(onnx, node),
                    node, node.op_type in OPS or node.op_type == SPLIT)
        if index in affines:
            factor, shift, op.activation, after = affines[index]
            op.affine = (factor, shift)
            if after:
                op.outputs = list(nodes[after[-1]].output[:1])
                op.fused += [nodes[i].op_type for i in after]
        steps.append(op)
    return steps


def _batch_norm_factors(onnx: Any, node: Any, constants: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNormalization of constant statistics as x * factor + shift per channel (float64)."""
    scale, bias, mean, var = (constants[i].astype(np.float64).reshape(-1) for i in node.input[1:5])
    factor = scale / np.sqrt(var + float(_attrs(onnx, node).get("epsilon", 1e-5)))
    return factor, bias - mean * factor


def _channel_factors(node: Any, tensor: str, constants: dict[str, np.ndarray],
                     channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(multiply, add) per channel (float64) for a Mul or Add of `tensor` (an NCHW tensor of
    `channels` channels) by a constant that is one value per channel or one in all (shape (C, 1, 1),
    (1, C, 1, 1), a scalar...); None for any other node."""
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2 or tensor not in node.input:
        return None
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    if other == tensor or other not in constants:
        return None
    value = np.asarray(constants[other])
    if value.dtype.kind != "f" or value.ndim > 4:
        return None
    dims = (1,) * (4 - value.ndim) + tuple(value.shape)
    if dims[0] != 1 or dims[2:] != (1, 1) or dims[1] not in (1, channels):
        return None
    full = value.reshape(dims)
    per_channel = np.broadcast_to(full.reshape(-1).astype(np.float64), (channels,)).copy()
    if node.op_type == "Mul":
        return per_channel, np.zeros(channels)
    return np.ones(channels), per_channel


def _activation(onnx: Any, node: Any, constants: dict[str, np.ndarray]) -> str | None:
    """'relu' for Relu, 'relu6' for Clip(0, 6) (attributes or constant inputs), else None."""
    if node.op_type == "Relu":
        return "relu"
    if node.op_type != "Clip":
        return None
    attrs = _attrs(onnx, node)
    if len(node.input) > 1:
        bounds = [None if not name else constants.get(name) for name in node.input[1:3]]
        if any(name and name not in constants for name in node.input[1:3]):
            return None
        low = None if len(bounds) < 1 or bounds[0] is None else float(np.asarray(bounds[0]))
        high = None if len(bounds) < 2 or bounds[1] is None else float(np.asarray(bounds[1]))
    else:
        low, high = attrs.get("min"), attrs.get("max")
    if low == 0.0 and high == 6.0:
        return "relu6"
    if low == 0.0 and high is None:
        return "relu"
    return None
