"""The onnx package's model-zoo graphs (onnx/backend/test/data/light/light_*.onnx) made runnable:
their weights are ConstantOfShape nodes; here they become random initializers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def zoo_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_models() -> list[str]:
    return sorted(p.name for p in zoo_dir().glob("light_*.onnx"))


def random_weight_model(name: str, seed: int) -> Any:
    """The zoo graph with every ConstantOfShape weight replaced by a random initializer."""
    import onnx
    from onnx import numpy_helper

    path = zoo_dir() / name
    model = onnx.load(str(path))
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    rng = np.random.default_rng(seed)
    variances = {node.input[4] for node in graph.node if node.op_type == "BatchNormalization" and len(node.input) > 4}
    kept, filled = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        shape, tensor = tuple(int(v) for v in constants[node.input[0]]), node.output[0]
        if tensor in variances:  # BatchNormalization's running variance
            values = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:  # weights, scaled by fan-in (He) so that activations stay near 1 deep down
            values = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        else:
            values = rng.standard_normal(shape) * 0.1
        filled.append(numpy_helper.from_array(values.astype(np.float32), tensor))
    used = {i for node in kept for i in node.input}
    initializers = [i for i in graph.initializer if i.name in used] + filled
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    # The graph lists its initializers as inputs too (IR version 3): drop those no longer there.
    dropped = set(constants) - {i.name for i in initializers}
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
    # IR version 3 reads an initializer only where it is also a graph input; 4 drops that rule.
    model.ir_version = max(model.ir_version, 4)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


