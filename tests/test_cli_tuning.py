"""`autoconv tune` and `autoconv db ...` through typer's runner, and --onnx model reading."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoconv.cli import app
from autoconv.store import SQLiteStore
from autoconv.cli.db import db_app

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
WIDE = {"COLUMNS": "250"}
LAYER = "n=1,c=8,h=10,w=10,k=8,r=3,s=3,pad=1"


@pytest.mark.parametrize("name", sorted(c.name or c.callback.__name__ for c in db_app.registered_commands))
def test_every_db_command_has_help_and_is_in_the_readme(name):
    result = runner.invoke(app, ["db", name, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert re.search(rf"autoconv db {name}\b", README.read_text()), f"README does not document `autoconv db {name}`"


def test_tune_then_list_show_merge_prune(opencl, tmp_path):
    db = tmp_path / "a.db"
    result = runner.invoke(app, ["tune", "--layer", LAYER, "--trials", "3", "--repeats", "2", "--db", str(db)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "tuned on" in result.output and "baseline ms" in result.output
    listed = runner.invoke(app, ["db", "list", "--db", str(db)], env=WIDE)
    assert listed.exit_code == 0 and "1x8x10x10 * 8x8x3x3 pad=1" in listed.output and "current" in listed.output
    for algorithm in ("im2col_gemm", "implicit_gemm"):  # (the untuned references only when steady)
        assert algorithm in listed.output
    served = [line for line in listed.output.splitlines() if " yes " in f"{line} "]
    assert len(served) == 1  # one served algorithm per layer, marked in the served column
    shown = runner.invoke(app, ["db", "show", LAYER, "--db", str(db)], env=WIDE)
    assert shown.exit_code == 0 and "params MWG=" in shown.output
    assert "im2col_blas: 1 configs measured (1 measurements): 1 ok" in shown.output
    assert "implicit_gemm: " in shown.output and "configs measured" in shown.output
    with SQLiteStore(db, readonly=True) as store:
        stored = len(store.results())
    assert stored >= 2
    merged = tmp_path / "merged.db"
    result = runner.invoke(app, ["db", "merge", str(db), "--db", str(merged)], env=WIDE)
    assert result.exit_code == 0 and f"{stored} result(s) merged" in result.output
    result = runner.invoke(app, ["db", "prune", "--db", str(merged), "--device", opencl.device.name], env=WIDE)
    assert result.exit_code == 0 and f"{stored} result(s) deleted" in result.output


def test_tune_with_a_time_budget(opencl, tmp_path):
    result = runner.invoke(app, ["tune", LAYER, "--time-budget", "3s", "--repeats", "1", "--db", str(tmp_path / "b.db")],
                           env=WIDE)
    assert result.exit_code == 0, result.output
    assert "tuned on" in result.output


def test_tune_a_model_shows_its_estimated_time_falling(opencl, tmp_path):
    # A two-conv model whose convolutions are one layer, twice: after the defaults and after it.
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = {name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)
               for name, shape in (("w1", (8, 8, 3, 3)), ("w2", (8, 8, 3, 3)))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    path = tmp_path / "twice.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    result = runner.invoke(app, ["tune", "--onnx", str(path), "--time-budget", "2s", "--repeats", "1", "--layouts",
                                 "NCHW", "--db", str(tmp_path / "m.db")], env=WIDE)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "the model's convolutions, estimated" in line]
    assert len(lines) == 2 and "after the defaults" in lines[-1], result.output  # one distinct layer, twice


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", LAYER, "--time-budget", "soon"], "duration"),
        (["tune", LAYER, "--backend", "numpy"], "opencl or cuda"),
        (["tune"], "LAYER"),
        (["tune", "--onnx", "missing.onnx"], "does not exist"),
        (["db", "list", "--db", "missing.db"], "does not exist"),
        (["db", "merge", "missing.db"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_foreign_database_is_refused_clearly(tmp_path):
    import sqlite3

    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("create table cats (name text)").connection.commit()
    result = runner.invoke(app, ["db", "list", "--db", str(foreign)])
    assert result.exit_code == 2 and "not an autoconv tuning database" in result.output


def _tiny_onnx(path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    w1 = numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((16, 1, 3, 3), np.float32), "w2")
    b2 = numpy_helper.from_array(np.ones((16,), np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y1"], name="stem", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["y2"]),
        helper.make_node("Conv", ["y2", "w2", "b2"], ["y3"], name="dw", group=16, auto_pad="SAME_UPPER"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("y3", TensorProto.FLOAT, None)], [w1, w2, b2])
    onnx.save(helper.make_model(graph), str(path))


def test_onnx_conv_shapes_are_read(tmp_path):
    from autoconv import ConvSpec
    from autoconv.onnx_layers import onnx_layers

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    layers, skipped = onnx_layers(path, batch=2)
    assert skipped == []
    assert [layer.name for layer in layers] == ["stem", "dw"]
    assert layers[0].spec == ConvSpec(2, 3, 32, 32, 16, 3, 3, stride=2, padding=1)
    assert layers[1].spec == ConvSpec(2, 16, 16, 16, 16, 3, 3, padding=1, groups=16, bias=True)


def test_tune_reads_an_onnx_model(opencl, tmp_path):
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    result = runner.invoke(app, ["tune", "--onnx", str(path), "--trials", "2", "--repeats", "1",
                                 "--db", str(tmp_path / "o.db")], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "tiny/stem" in result.output and "tiny/dw" in result.output
