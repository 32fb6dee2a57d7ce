"""Whole ONNX models (autoconv.onnx.load): each fusion and each operator against onnxruntime on
small graphs built with onnx.helper, a whole small CNN, weights as initializers and as
ConstantOfShape, the onnx.reference fallback, and the errors, each one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import autoconv  # noqa: E402
import autoconv.onnx as aonnx  # noqa: E402
from autoconv.graph.prepare import UnsupportedModelError  # noqa: E402

RNG = np.random.default_rng(20261204)
TOLERANCE = 1e-4


def _value(name: str, shape: tuple[int, ...], elem: int = TensorProto.FLOAT) -> object:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(nodes: list, inputs: list, outputs: list, initializers: dict[str, np.ndarray] | None = None,
           opset: int = 13) -> object:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _onnxruntime(model: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))


def _assert_like_onnxruntime(model: object, feed: dict[str, np.ndarray], **load: object) -> object:
    loaded = aonnx.load(model, **load)
    got = loaded.run(None, feed)
    expected = _onnxruntime(model, feed)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert _error(g, e) < TOLERANCE, f"relative error {_error(g, e):.2e}"
    return loaded


def _weights(k: int, c: int, r: int) -> dict[str, np.ndarray]:
    return {"w": RNG.standard_normal((k, c, r, r)).astype(np.float32) * 0.3,
            "b": RNG.standard_normal(k).astype(np.float32),
            "scale": RNG.uniform(0.5, 1.5, k).astype(np.float32), "shift": RNG.standard_normal(k).astype(np.float32),
            "mean": RNG.standard_normal(k).astype(np.float32) * 0.1, "var": RNG.uniform(0.5, 1.5, k).astype(np.float32)}


X = RNG.standard_normal((2, 3, 9, 9)).astype(np.float32)


@pytest.mark.parametrize("tail, fused", [
    ([], "Conv"),
    (["bn"], "Conv+BatchNormalization"),
    (["bn", "mul", "add_c", "relu"], "Conv+BatchNormalization+Mul+Add+Relu"),  # DenseNet's Caffe2 export
    (["mul_s", "add_c", "add"], "Conv+Mul+Add+Add"),
    (["bn", "relu"], "Conv+BatchNormalization+Relu"),
    (["bn", "add", "relu"], "Conv+BatchNormalization+Add+Relu"),
    (["clip6"], "Conv+Clip"),
    (["add"], "Conv+Add"),
])
def test_each_fusion_matches_onnxruntime(opencl, tail, fused):
    init = _weights(3, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], pads=[1, 1, 1, 1])]
    current = "t0"
    for i, op in enumerate(tail, start=1):
        out = f"t{i}"
        if op == "bn":
            nodes.append(helper.make_node("BatchNormalization", [current, "scale", "shift", "mean", "var"], [out],
                                          epsilon=1e-3))
        elif op == "relu":
            nodes.append(helper.make_node("Relu", [current], [out]))
        elif op == "add":
            nodes.append(helper.make_node("Add", [current, "x"], [out]))  # the block's input as the shortcut
        elif op == "clip6":
            init["lo"], init["hi"] = np.array(0, np.float32), np.array(6, np.float32)
            nodes.append(helper.make_node("Clip", [current, "lo", "hi"], [out]))
        elif op == "mul":  # one factor per channel, shaped (C, 1, 1)
            init["m"] = RNG.uniform(0.5, 1.5, (3, 1, 1)).astype(np.float32)
            nodes.append(helper.make_node("Mul", [current, "m"], [out]))
        elif op == "mul_s":  # one factor for all, the constant first
            init["s"] = np.array(1.7, np.float32)
            nodes.append(helper.make_node("Mul", ["s", current], [out]))
        elif op == "add_c":  # one shift per channel, shaped (1, C, 1, 1)
            init["a"] = RNG.standard_normal((1, 3, 1, 1)).astype(np.float32)
            nodes.append(helper.make_node("Add", [current, "a"], [out]))
        current = out
    model = _model(nodes, [_value("x", X.shape)], [_value(current, (2, 3, 9, 9))], init)
    loaded = _assert_like_onnxruntime(model, {"x": X})
    rows = loaded.describe()
    assert [(r.ops, r.runs_on) for r in rows] == [(fused, "autoconv layer")]


def test_weights_computed_by_constant_of_shape_are_folded(opencl):
    shape = np.array([4, 3, 3, 3], np.int64)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02])),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    model = _model(nodes, [_value("x", X.shape)], [_value("y", (2, 4, 7, 7))], {"shape": shape})
    loaded = _assert_like_onnxruntime(model, {"x": X})
    assert [r.runs_on for r in loaded.describe()] == ["autoconv layer"]


def _single(op: str, inputs: list[str], x_shape: tuple[int, ...], out_shape: tuple[int, ...] | None = None,
            initializers: dict | None = None, opset: int = 13, outputs: int = 1, **attrs: object) -> object:
    names = ["y"] if outputs == 1 else [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, inputs, names, **attrs)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    return _model([node], [_value("x", x_shape)], outs, initializers, opset)


POOL_INPUT = RNG.standard_normal((1, 2, 11, 10)).astype(np.float32)
OPERATORS = {
    "maxpool": ("MaxPool", ["x"], {}, 13, 1, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1])),
    "maxpool-ceil": ("MaxPool", ["x"], {}, 13, 1, dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "avgpool": ("AveragePool", ["x"], {}, 13, 1, dict(kernel_shape=[3, 2], strides=[1, 2], pads=[1, 1, 0, 1])),
    "avgpool-count-pad": ("AveragePool", ["x"], {}, 13, 1, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                                count_include_pad=1)),
    "avgpool-ceil": ("AveragePool", ["x"], {}, 13, 1, dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "avgpool-same": ("AveragePool", ["x"], {}, 13, 1, dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "global-avgpool": ("GlobalAveragePool", ["x"], {}, 13, 1, {}),
    "concat": ("Concat", ["x", "x"], {}, 13, 1, dict(axis=1)),
    "flatten": ("Flatten", ["x"], {}, 13, 1, dict(axis=2)),
    "reshape": ("Reshape", ["x", "shape"], {"shape": np.array([0, -1, 5], np.int64)}, 13, 1, {}),
    "transpose": ("Transpose", ["x"], {}, 13, 1, dict(perm=[0, 2, 1, 3])),
    "softmax-13": ("Softmax", ["x"], {}, 13, 1, dict(axis=1)),
    "softmax-11": ("Softmax", ["x"], {}, 11, 1, dict(axis=1)),
    "lrn": ("LRN", ["x"], {}, 13, 1, dict(size=3, alpha=1e-2, beta=0.75, bias=2.0)),
    "lrn-any-beta": ("LRN", ["x"], {}, 13, 1, dict(size=5, alpha=3e-2, beta=0.6, bias=1.0)),
    "lrn-alexnet": ("LRN", ["x"], {}, 13, 1, dict(size=5, alpha=1e-4, beta=0.75)),
    "dropout": ("Dropout", ["x"], {}, 13, 1, {}),
    "identity": ("Identity", ["x"], {}, 13, 1, {}),
    "add-broadcast": ("Add", ["x", "c"], {"c": RNG.standard_normal((2, 1, 1)).astype(np.float32)}, 13, 1, {}),
    "mul": ("Mul", ["x", "x"], {}, 13, 1, {}),
    "relu": ("Relu", ["x"], {}, 13, 1, {}),
    "clip": ("Clip", ["x", "lo", "hi"], {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}, 13, 1, {}),
    "sigmoid": ("Sigmoid", ["x"], {}, 13, 1, {}),
    "pad-constant": ("Pad", ["x", "pads", "v"], {"pads": np.array([0, 0, 1, 2, 0, 1, 0, 3], np.int64),
                                                 "v": np.array(1.5, np.float32)}, 13, 1, dict(mode="constant")),
    "pad-reflect": ("Pad", ["x", "pads"], {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, 13, 1,
                    dict(mode="reflect")),
    "pad-edge": ("Pad", ["x", "pads"], {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, 13, 1, dict(mode="edge")),
    "split": ("Split", ["x", "sizes"], {"sizes": np.array([4, 7], np.int64)}, 13, 2, dict(axis=2)),
    "split-even": ("Split", ["x"], {}, 13, 2, dict(axis=1)),
    "batchnorm": ("BatchNormalization", ["x", "s", "b", "m", "v"],
                  {"s": np.array([1.5, 0.5], np.float32), "b": np.array([0.1, -0.2], np.float32),
                   "m": np.array([0.3, -0.1], np.float32), "v": np.array([0.9, 1.2], np.float32)}, 13, 1, {}),
    "sum": ("Sum", ["x", "x", "x"], {}, 13, 1, {}),
}


@pytest.mark.parametrize("case", list(OPERATORS), ids=list(OPERATORS))
def test_each_operator_matches_onnxruntime(case):
    op, inputs, init, opset, outputs, attrs = OPERATORS[case]
    model = _single(op, inputs, POOL_INPUT.shape, initializers=init, opset=opset, outputs=outputs, **attrs)
    loaded = _assert_like_onnxruntime(model, {"x": POOL_INPUT}, backend="numpy")
    assert {r.runs_on for r in loaded.describe()} == {"numpy"}


@pytest.mark.parametrize("case", ["gemm", "matmul"])
def test_the_classifier_operators_match_onnxruntime(case):
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    w = RNG.standard_normal((5, 8)).astype(np.float32)
    if case == "gemm":
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)
        init = {"w": w, "c": RNG.standard_normal(5).astype(np.float32)}
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        init = {"w": w.T.copy()}
    model = _model([node], [_value("x", x.shape)], [_value("y", (3, 5))], init)
    _assert_like_onnxruntime(model, {"x": x}, backend="numpy")


def small_cnn() -> object:
    """conv-bn-relu, max pool, a residual block, a 1x1 branch concatenated, average pool, classifier."""
    init = {}
    for name, (k, c, r) in {"c1": (8, 3, 3), "c2": (8, 8, 3), "c3": (8, 8, 3), "c4": (4, 8, 1)}.items():
        for key, value in _weights(k, c, r).items():
            init[f"{name}_{key}"] = value
    init["fc_w"] = RNG.standard_normal((10, 12)).astype(np.float32)
    init["fc_b"] = RNG.standard_normal(10).astype(np.float32)

    def conv_bn(name: str, x: str, out: str, pad: int, relu: bool = True, residual: str | None = None) -> list:
        nodes = [helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[pad] * 4),
                 helper.make_node("BatchNormalization", [f"{name}_c", f"{name}_scale", f"{name}_shift", f"{name}_mean",
                                                         f"{name}_var"], [f"{name}_bn"])]
        last = f"{name}_bn"
        if residual:
            nodes.append(helper.make_node("Add", [last, residual], [f"{name}_add"]))
            last = f"{name}_add"
        if relu:
            nodes.append(helper.make_node("Relu", [last], [out]))
        else:
            nodes.append(helper.make_node("Identity", [last], [out]))
        return nodes

    nodes = [*conv_bn("c1", "x", "a1", 1),
             helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             *conv_bn("c2", "p1", "a2", 1),
             *conv_bn("c3", "a2", "a3", 1, residual="p1"),
             *conv_bn("c4", "a3", "a4", 0),
             helper.make_node("Concat", ["a3", "a4"], ["cat"], axis=1),
             helper.make_node("GlobalAveragePool", ["cat"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    return _model(nodes, [_value("x", (2, 3, 16, 16))], [_value("logits", (2, 10)), _value("prob", (2, 10))], init)


def test_a_whole_small_cnn_matches_onnxruntime_and_keeps_convs_on_the_device(opencl):
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    loaded = _assert_like_onnxruntime(small_cnn(), {"x": x})
    rows = loaded.describe()
    assert sum(r.runs_on == "autoconv layer" for r in rows) == 4
    assert "Conv+BatchNormalization+Add+Relu" in [r.ops for r in rows]
    assert loaded.run(["prob"], {"x": x})[0].shape == (2, 10)
    outputs, times = loaded.timed_run({"x": x})
    assert len(times) == len(rows) and all(ms >= 0 for _, ms in times)


@pytest.mark.parametrize("layout", ["NCHW8c", "NCHW4c"])
def test_a_whole_small_cnn_runs_channel_blocked_between_its_convolutions(opencl, monkeypatch, layout):
    """layout=: every conv a blocked_direct layer in the layout; the max pooling a device kernel in
    the layout; reorders only at the first conv's NCHW input (and by the host where numpy reads a
    conv's result: the Concat)."""
    from conftest import record_launches

    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    launched = record_launches(opencl, monkeypatch)
    loaded = _assert_like_onnxruntime(small_cnn(), {"x": x}, layout=layout)
    plans = [r.plan for r in loaded.describe() if r.runs_on == "autoconv layer"]
    assert len(plans) == 4 and all(plan.startswith("blocked_direct") for plan in plans), plans
    # To the layout: x only; p1 (c2's input and c3's residual), a2 -> c3 and a3 -> c4 stay blocked
    # (else more reorders to it). Back to NCHW: where numpy reads (the Concat), by the host as it
    # reads it, so no kernel.
    assert launched.count("reorder_to_blocked") == 1, launched
    assert "reorder_to_nchw" not in launched, launched
    assert launched.count("max_pool") == 1, launched
    assert [r.runs_on for r in loaded.describe() if r.ops == "MaxPool"] == ["device kernel"]


def test_an_operator_without_a_kernel_runs_by_reference_said_once():
    model = _single("Tanh", ["x"], POOL_INPUT.shape)
    with pytest.warns(RuntimeWarning, match="Tanh: these nodes run through onnx.reference"):
        loaded = aonnx.load(model, backend="numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = loaded(POOL_INPUT)
    assert _error(got, np.tanh(POOL_INPUT.astype(np.float64))) < TOLERANCE
    assert [r.runs_on for r in loaded.describe()] == ["onnx.reference"]


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_what_cannot_run_is_one_line_naming_the_node(tmp_path):
    dynamic = _model([helper.make_node("Relu", ["x"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])])
    with pytest.raises(UnsupportedModelError) as excinfo:
        aonnx.load(dynamic, backend="numpy")
    assert "'N'" in _one_line(excinfo) and "input_shapes" in _one_line(excinfo)
    fixed = aonnx.load(dynamic, backend="numpy", input_shapes={"x": (2, 3, 4, 4)})
    assert fixed(np.ones((2, 3, 4, 4), np.float32)).shape == (2, 3, 4, 4)

    ints = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", (2, 2), TensorProto.INT32)],
                  [_value("y", (2, 2), TensorProto.INT32)])
    with pytest.raises(UnsupportedModelError) as excinfo:
        aonnx.load(ints, backend="numpy")
    assert "float32" in _one_line(excinfo)

    training = _single("BatchNormalization", ["x", "s", "b", "m", "v"], (1, 2, 3, 3), opset=15,
                       initializers={k: np.ones(2, np.float32) for k in "sbmv"}, training_mode=1)
    with pytest.raises(UnsupportedModelError) as excinfo:
        aonnx.load(training, backend="numpy")
    assert "training-mode BatchNormalization" in _one_line(excinfo)

    with pytest.raises(UnsupportedModelError) as excinfo:
        aonnx.load(tmp_path / "missing.onnx")
    assert "is not a file" in _one_line(excinfo)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UnsupportedModelError) as excinfo:
        aonnx.load(tmp_path / "junk.onnx")
    assert "not a readable ONNX model" in _one_line(excinfo)


def test_a_bad_input_feed_is_one_line():
    loaded = aonnx.load(_single("Relu", ["x"], (1, 2, 3, 3)), backend="numpy")
    for feed, needle in [({"z": np.ones((1, 2, 3, 3), np.float32)}, "missing ['x']"),
                         ({"x": np.ones((1, 2, 3), np.float32)}, "expected shape (1, 2, 3, 3)"),
                         ({"x": np.ones((1, 2, 3, 3), np.float64)}, "expected float32")]:
        with pytest.raises(UnsupportedModelError) as excinfo:
            loaded.run(None, feed)
        assert needle in _one_line(excinfo)
    with pytest.raises(UnsupportedModelError) as excinfo:
        loaded.run(["nope"], {"x": np.ones((1, 2, 3, 3), np.float32)})
    assert "not outputs" in _one_line(excinfo)


def test_an_operator_variant_numpy_lacks_runs_by_reference_said_once():
    model = _single("MaxPool", ["x"], POOL_INPUT.shape, kernel_shape=[2, 2], dilations=[2, 2])
    loaded = aonnx.load(model, backend="numpy")
    with pytest.warns(RuntimeWarning, match="dilated pooling runs through onnx.reference"):
        got = loaded(POOL_INPUT)
    assert _error(got, _onnxruntime(model, {"x": POOL_INPUT})[0]) < TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(POOL_INPUT)
    assert [r.runs_on for r in loaded.describe()] == ["onnx.reference"]


def test_tune_onnx_reads_each_conv_with_the_epilogue_the_runner_fuses(tmp_path):
    from autoconv.onnx_layers import onnx_layers

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), str(path))
    layers, skipped = onnx_layers(path)
    assert not skipped
    assert [(layer.spec.bias, layer.spec.activation, layer.spec.residual) for layer in layers] == [
        (True, "relu", False), (True, "relu", False), (True, "relu", True), (True, "relu", False)]


def test_model_bench_reports_both_runtimes_per_op_and_per_step(tmp_path, opencl):
    import json

    from typer.testing import CliRunner

    from autoconv.cli.main import app

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), str(path))
    result = CliRunner().invoke(app, ["model", "bench", str(path), "--rounds", "1", "--repeats", "1", "--json",
                                      "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["max_relative_error"] < TOLERANCE
    assert report["autoconv_ms"] > 0 and report["onnxruntime_ms"] > 0
    # the pooling on the device, the classifier a 1x1 conv
    assert {s["runs_on"] for s in report["steps"]} == {"autoconv layer", "device kernel", "numpy",
                                                        "autoconv layer (1x1 conv)"}
    assert len(report["fallback_layers"]) == 4  # nothing tuned: every conv layer on a fallback plan
    assert "Conv+BatchNormalization+Add+Relu" in report["per_op_ms"]

    missing = CliRunner().invoke(app, ["model", "bench", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2 and "is not a file" in missing.output and len(missing.output.strip().splitlines()) == 1
    fixed = CliRunner().invoke(app, ["model", "bench", str(path), "--batch", "3", "--rounds", "1", "--repeats", "1",
                                     "--json", "--db", str(tmp_path / "none.db")])
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(fixed.stdout[fixed.stdout.index("{"):])["batch"] == 3
    blocked = CliRunner().invoke(app, ["model", "bench", str(path), "--layout", "NCHW8c", "--rounds", "1",
                                       "--repeats", "1", "--json", "--db", str(tmp_path / "none.db")])
    assert blocked.exit_code == 0, blocked.output
    report = json.loads(blocked.stdout[blocked.stdout.index("{"):])
    assert report["max_relative_error"] < TOLERANCE
    assert all(s["plan"].startswith("blocked_direct") for s in report["steps"] if s["runs_on"] == "autoconv layer")
    wrong = CliRunner().invoke(app, ["model", "bench", str(path), "--layout", "NHWC"])
    assert wrong.exit_code == 2 and "--layout" in wrong.output


def test_the_host_blas_is_held_to_one_thread_while_a_cpu_device_runs_the_model(opencl, monkeypatch):
    """OpenBLAS's idle threads would spin on the cores a CPU device's kernels need."""
    from threadpoolctl import threadpool_info

    from autoconv.graph import ops

    if opencl.device.device_type != "cpu":
        pytest.skip("the default OpenCL device is not a CPU")
    seen = []
    real_gemm = ops.OPS["Gemm"]

    def spying_gemm(inputs, attrs, opset):
        seen.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        return real_gemm(inputs, attrs, opset)

    monkeypatch.setitem(ops.OPS, "Gemm", spying_gemm)
    # The classifier on the host BLAS (it runs on the device as a 1x1 conv otherwise).
    monkeypatch.setattr("autoconv.graph.runner.dense_weights", lambda *args: None)
    loaded = aonnx.load(small_cnn())
    loaded(RNG.standard_normal((2, 3, 16, 16)).astype(np.float32))
    assert seen == [{1}]
    outside = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
    on_host = aonnx.load(small_cnn(), backend="numpy")  # nothing to share the cores with: untouched
    seen.clear()
    on_host(RNG.standard_normal((2, 3, 16, 16)).astype(np.float32))
    assert seen == [outside]


def chain_cnn(groups: int = 1) -> object:
    """conv-relu, max pool, a residual conv (grouped if asked), average pool, classifier: a chain,
    no branches joined by Concat."""
    init = {"w1": RNG.standard_normal((16, 3, 3, 3)).astype(np.float32), "b1": RNG.standard_normal(16).astype(np.float32),
            "w2": RNG.standard_normal((16, 16 // groups, 3, 3)).astype(np.float32),
            "fc_w": RNG.standard_normal((10, 16)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Add", ["c2", "p1"], ["s2"]),
             helper.make_node("Relu", ["s2"], ["a2"]),
             helper.make_node("GlobalAveragePool", ["a2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1)]
    return _model(nodes, [_value("x", (2, 3, 16, 16))], [_value("logits", (2, 10))], init)


def test_a_model_keeps_the_devices_layout_unless_told_and_tune_onnx_tunes_in_it(opencl, tmp_path):
    """On PoCL (a CPU device whose arrays carry layouts) a chain of convolutions that all run
    blocked (depthwise ones included) runs channel-blocked at the CPU's vector width unless told; a
    graph joining branches with Concat, or with a grouped layer no algorithm runs blocked, runs NCHW;
    the host backend NCHW. `tune --onnx` tunes
    the layers in the layout the model will serve them in."""
    from typer.testing import CliRunner

    from autoconv.algorithms.blocked_direct import preferred_block
    from autoconv.cli.main import app
    from autoconv.graph.runner import model_layout
    from autoconv.store import SQLiteStore

    expected = f"NCHW{preferred_block(opencl.device)}c"
    assert model_layout("opencl", None) == expected and model_layout("numpy", None) == "NCHW"
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert aonnx.load(chain_cnn()).layout == expected
    assert aonnx.load(chain_cnn(), layout="NCHW").layout == "NCHW"
    assert aonnx.load(small_cnn()).layout == "NCHW"  # its Concat
    assert aonnx.load(chain_cnn(groups=8)).layout == "NCHW"  # 2 channels per group: no algorithm runs it blocked
    assert aonnx.load(chain_cnn(groups=16)).layout == expected  # depthwise: depthwise_direct runs it blocked
    with pytest.raises(autoconv.InvalidSpecError, match="layout: expected None or one of"):
        aonnx.load(chain_cnn(), layout="NHWC")
    _assert_like_onnxruntime(chain_cnn(groups=16), {"x": x})
    path = tmp_path / "chain.onnx"
    onnx.save(chain_cnn(), str(path))
    db = tmp_path / "tuned.db"
    result = CliRunner().invoke(app, ["tune", "--onnx", str(path), "--trials", "1", "--algorithm", "blocked_direct",
                                      "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    with SQLiteStore(db) as store:
        layouts = {r.spec.c: r.spec.layout for r in store.results()}
    # The first conv reads the 3-channel input as NCHW (fills_blocks); the next one is blocked.
    assert layouts.pop(3) == "NCHW" and set(layouts.values()) == {expected}, layouts
    loaded = _assert_like_onnxruntime(chain_cnn(), {"x": x}, db=str(db))
    rows = loaded.describe()
    plans = [r.plan for r in rows if r.runs_on == "autoconv layer"]
    assert len(plans) == 2 and all("(tuned" in plan for plan in plans), plans
    assert [r.runs_on for r in rows if r.ops in ("MaxPool", "GlobalAveragePool")] == ["device kernel"] * 2


def _classifier(batch: int, gemm: dict, c_shape: tuple[int, ...] | None, matmul: bool = False) -> object:
    """conv, global average pool, flatten, then a fully connected layer (Gemm with `gemm`'s
    attributes, or MatMul) and a relu: a CNN's classifier head."""
    init = {"w": RNG.standard_normal((24, 3, 3, 3)).astype(np.float32),
            "fc": RNG.standard_normal((24, 10) if matmul or not gemm.get("transB") else (10, 24)).astype(np.float32)}
    fc_inputs = ["flat", "fc"]
    if c_shape is not None:
        init["c"] = RNG.standard_normal(c_shape).astype(np.float32)
        fc_inputs.append("c")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["y"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("MatMul", fc_inputs[:2], ["logits"]) if matmul
             else helper.make_node("Gemm", fc_inputs, ["logits"], **gemm),
             helper.make_node("Relu", ["logits"], ["out"])]
    return _model(nodes, [_value("x", (batch, 3, 8, 8))], [_value("out", (batch, 10))], init)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", ["transB", "plain+alpha+beta", "scalar C", "MatMul"])
def test_a_fully_connected_layer_with_constant_weights_runs_as_a_device_conv(opencl, batch, variant):
    gemm, c_shape, matmul = {
        "transB": (dict(transB=1), (10,), False),
        "plain+alpha+beta": (dict(alpha=0.5, beta=2.0), (1, 10), False),
        "scalar C": (dict(transB=1, beta=-1.0), (1,), False),
        "MatMul": ({}, None, True),
    }[variant]
    x = RNG.standard_normal((batch, 3, 8, 8)).astype(np.float32)
    loaded = _assert_like_onnxruntime(_classifier(batch, gemm, c_shape, matmul), {"x": x})
    fc = [row for row in loaded.describe() if row.ops in ("Gemm", "MatMul")]
    assert [row.runs_on for row in fc] == ["autoconv layer (1x1 conv)"] and "heuristic" in fc[0].plan, fc


def test_a_fully_connected_layer_numpy_runs_where_the_weights_are_not_constant_or_c_varies(opencl):
    # C of shape (batch, 10) varies along the batch: not a bias; numpy's Gemm runs it.
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    loaded = _assert_like_onnxruntime(_classifier(2, dict(transB=1), (2, 10)), {"x": x})
    assert [row.runs_on for row in loaded.describe() if row.ops == "Gemm"] == ["numpy"]


def test_the_pooling_of_a_host_result_runs_on_the_device(opencl):
    # small_cnn's GlobalAveragePool reads its Concat's result, a host array: it goes to the device.
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    loaded = _assert_like_onnxruntime(small_cnn(), {"x": x})
    rows = {row.ops: row.runs_on for row in loaded.describe()}
    assert rows["Concat"] == "numpy" and rows["GlobalAveragePool"] == "device kernel", rows


def test_a_mul_or_add_by_a_constant_that_is_not_per_channel_stays_a_step(opencl):
    """(C,) broadcasts along the width, not the channels: not folded into the conv."""
    init = _weights(3, 3, 3)
    init["m"] = RNG.uniform(0.5, 1.5, 9).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["t0", "m"], ["t1"])]
    model = _model(nodes, [_value("x", X.shape)], [_value("t1", (2, 3, 9, 9))], init)
    loaded = _assert_like_onnxruntime(model, {"x": X})
    assert [(r.ops, r.runs_on) for r in loaded.describe()] == [("Conv", "autoconv layer"), ("Mul", "numpy")]


def pre_activation_cnn(after: str) -> object:
    """conv-relu, then a BatchNormalization of its own (DenseNet's pre-activation) with `after`
    ("relu", "clip6", "none", or "output": its result also a graph output), then a conv: 20 channels,
    a partial last block in every blocked layout."""
    init = {"w1": RNG.standard_normal((20, 3, 3, 3)).astype(np.float32) * 0.3,
            "w2": RNG.standard_normal((8, 20, 1, 1)).astype(np.float32) * 0.3,
            "scale": RNG.uniform(0.5, 1.5, 20).astype(np.float32), "shift": RNG.standard_normal(20).astype(np.float32),
            "mean": RNG.standard_normal(20).astype(np.float32), "var": RNG.uniform(0.5, 1.5, 20).astype(np.float32),
            "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("BatchNormalization", ["a1", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3)]
    if after == "relu":
        nodes.append(helper.make_node("Relu", ["bn"], ["act"]))
    elif after == "mul-add-relu":  # DenseNet's Caffe2 export: the scale and shift as a Mul and an Add
        init["m"] = RNG.uniform(0.5, 1.5, (20, 1, 1)).astype(np.float32)
        init["a"] = RNG.standard_normal((1, 20, 1, 1)).astype(np.float32)
        nodes += [helper.make_node("Mul", ["bn", "m"], ["bm"]), helper.make_node("Add", ["a", "bm"], ["ba"]),
                  helper.make_node("Relu", ["ba"], ["act"])]
    elif after == "clip6":
        nodes.append(helper.make_node("Clip", ["bn", "lo", "hi"], ["act"]))
    nodes.append(helper.make_node("Conv", ["act" if after in ("relu", "clip6", "mul-add-relu") else "bn", "w2"], ["y"]))
    outputs = [_value("y", (2, 8, 9, 9))] + ([_value("bn", (2, 20, 9, 9))] if after == "output" else [])
    return _model(nodes, [_value("x", (2, 3, 9, 9))], outputs, init)


@pytest.mark.parametrize("layout", ["NCHW", "NCHW8c", "NCHW16c"])
@pytest.mark.parametrize("after, ops", [("relu", "BatchNormalization+Relu"), ("clip6", "BatchNormalization+Clip"),
                                        ("mul-add-relu", "BatchNormalization+Mul+Add+Relu"),
                                        ("none", "BatchNormalization"), ("output", "BatchNormalization")])
def test_a_batch_normalization_after_no_conv_runs_on_the_device_with_its_activation(opencl, layout, after, ops):
    x = RNG.standard_normal((2, 3, 9, 9)).astype(np.float32) * 3
    loaded = _assert_like_onnxruntime(pre_activation_cnn(after), {"x": x}, layout=layout)
    rows = loaded.describe()
    assert [(r.ops, r.runs_on) for r in rows if not r.ops.startswith("Conv")] == [(ops, "device kernel")]


def test_a_standalone_batch_normalization_runs_in_numpy_where_no_device_runs_the_model():
    x = RNG.standard_normal((2, 3, 9, 9)).astype(np.float32)
    loaded = _assert_like_onnxruntime(pre_activation_cnn("relu"), {"x": x}, backend="numpy")
    assert [(r.ops, r.runs_on) for r in loaded.describe() if not r.ops.startswith("Conv")] == \
        [("BatchNormalization+Relu", "numpy")]
