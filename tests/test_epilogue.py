"""The fused epilogue as part of the layer: its key, validation, LAYER strings, the tuning
database (schema 5; older layers read as unfused), the lookup (a fused layer takes its
convolution's tuned plan), export run from C, and `autoconv tune` on a fused layer."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autoconv import ConvSpec, get_algorithm, lookup
from autoconv.algorithms import EMPTY_SPACE
from autoconv.cli import app
from autoconv.errors import InvalidSpecError
from autoconv.layers import layer_name, layer_text, parse_layer
from autoconv.render import template_hash
from autoconv.store import SQLiteStore, TunedResult
from autoconv.tuning.verify import random_operands, reference_output

runner = CliRunner()
PLAIN = ConvSpec(1, 8, 10, 10, 12, 3, 3, padding=1, bias=True)
FUSED = PLAIN.replace(activation="relu", residual=True)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c" / "build_and_run.sh"


def test_the_epilogue_is_part_of_the_key_and_old_keys_are_unchanged():
    assert PLAIN.key() == "n1_c8_h10_w10_k12_r3_s3_st1x1_pd1x1_dl1x1_g1_b1_float32_NCHW"
    keys = {spec.key() for spec in (PLAIN, FUSED, PLAIN.replace(activation="relu"), PLAIN.replace(activation="relu6"),
                                    PLAIN.replace(residual=True))}
    assert len(keys) == 5
    assert FUSED.fused and not PLAIN.fused and FUSED.unfused() == PLAIN
    assert PLAIN.replace(activation=None) == PLAIN  # None is "none", as torch's activation=None
    assert str(FUSED).endswith("+residual relu")


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="gelu"), "activation: expected None or one of"),
    (dict(activation=1), "activation"),
    (dict(residual="yes"), "residual: expected True or False"),
    (dict(residual=np.bool_(True)), None),
])
def test_epilogue_fields_are_validated(kwargs, message):
    if message is None:
        assert PLAIN.replace(**kwargs).residual is True
        return
    with pytest.raises(InvalidSpecError, match=message):
        PLAIN.replace(**kwargs)


def test_the_reference_applies_the_residual_then_the_activation():
    x, w, b, r = random_operands(FUSED, seed=1)
    plain = reference_output(PLAIN, (x, w, b))
    np.testing.assert_allclose(reference_output(FUSED, (x, w, b, r)), np.maximum(plain + r, 0), rtol=1e-12)
    six = PLAIN.replace(activation="relu6")
    np.testing.assert_allclose(reference_output(six, (x, w, b)), np.clip(plain, 0, 6), rtol=1e-12)
    assert len(random_operands(PLAIN)) == 3 and random_operands(FUSED)[3].shape == FUSED.output_shape


def test_layer_strings_name_the_epilogue_and_read_back():
    layer = parse_layer("n=1,c=8,h=10,w=10,k=12,r=3,s=3,pad=1,bias=1,residual=1,act=relu")
    assert layer.spec == FUSED
    assert parse_layer(layer_text(FUSED)).spec == FUSED
    assert parse_layer(layer_text(PLAIN.replace(activation="relu6"))).spec.activation == "relu6"
    with pytest.raises(InvalidSpecError, match="act must be relu or relu6"):
        parse_layer("c=8,h=10,w=10,k=12,r=3,s=3,act=tanh")
    with pytest.raises(InvalidSpecError, match="residual must be 0 or 1"):
        parse_layer("c=8,h=10,w=10,k=12,r=3,s=3,residual=2")
    assert layer_name(ConvSpec(1, 64, 56, 56, 256, 1, 1, activation="relu", residual=True)) \
        == "resnet50/res2_1x1b+residual+relu"


def _save(path, spec, device, algorithm="im2col_gemm", median_ms=1.0, **params):
    with SQLiteStore(path) as db:
        db.record_device(device)
        db.save_result(TunedResult(
            device=device.fingerprint(), spec=spec, algorithm=algorithm, template_hash=template_hash(),
            params=(get_algorithm(algorithm).space if params or algorithm != "im2col_blas" else EMPTY_SPACE).validate(params),
            median_ms=median_ms, gflops=1.0, rel_error=1e-6, default_ms=None, trials=1))


def test_fused_layers_are_stored_and_read_back(opencl, tmp_path):
    path = tmp_path / "t.db"
    _save(path, FUSED, opencl.device, MWG=16)
    with SQLiteStore(path, readonly=True) as db:
        (result,) = db.results()
        assert result.spec == FUSED
        row = next(db.db["layers"].rows)
        assert (row["activation"], row["residual"]) == ("relu", 1)


def test_older_layers_read_as_unfused(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    _save(path, PLAIN, _gpu(), MWG=16)
    with sqlite3.connect(path) as connection:  # a row written before schema 5 has no epilogue columns set
        connection.execute("UPDATE layers SET activation = NULL, residual = NULL")
    with SQLiteStore(path, readonly=True) as db:
        assert [r.spec for r in db.results()] == [PLAIN]


def _gpu():
    from autoconv.device import DeviceInfo

    return DeviceInfo("opencl", "Fake CL", "fakevendor", "Fake GPU 1", "1.0", "gpu", 8, 49152, 1024, (1024, 1024, 64))


def test_a_fused_layer_takes_its_convolutions_tuned_plan(tmp_path):
    path = tmp_path / "t.db"
    gpu = _gpu()
    _save(path, PLAIN, gpu, MWG=16)
    plan = lookup(FUSED, gpu, path)
    assert plan.params.MWG == 16 and "the same convolution, another epilogue" in plan.source
    _save(path, FUSED, gpu, MWG=64)  # then its own tuned result once it has one
    assert lookup(FUSED, gpu, path).params.MWG == 64 and lookup(FUSED, gpu, path).source == "tuned"
    assert lookup(PLAIN, gpu, path).params.MWG == 16


@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/CL/cl.h").exists(),
                    reason="needs gcc and the OpenCL headers (scripts/install_pocl.sh installs them)")
@pytest.mark.parametrize("algorithm", ["im2col_gemm", "implicit_gemm", "winograd", "direct"])
def test_a_fused_layer_exports_and_runs_from_c(opencl, tmp_path, algorithm):
    path = tmp_path / "fused.db"
    _save(path, FUSED, opencl.device, algorithm, **get_algorithm(algorithm).heuristic(FUSED, opencl.device).as_dict())
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--db", str(path), "--out", str(out), "--all", "--reference"])
    assert result.exit_code == 0, result.output
    (layer,) = json.loads((out / "manifest.json").read_text())["layers"]
    assert layer["buffers"]["residual"] == FUSED.output_bytes and "residual" in layer["reference"]
    assert layer["shape"]["activation"] == "relu" and layer["shape"]["residual"] is True
    run = subprocess.run(["bash", str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.count("-> OK") == 1, run.stdout + run.stderr


def test_tuning_a_fused_layer_stores_it_under_its_own_key(opencl, tmp_path):
    path = tmp_path / "tune.db"
    text = "n=1,c=4,h=8,w=8,k=8,r=3,s=3,pad=1,residual=1,act=relu6"
    result = runner.invoke(app, ["tune", text, "--db", str(path), "--trials", "6", "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    spec = parse_layer(text).spec
    with SQLiteStore(path, readonly=True) as db:
        tuned = db.results()
    assert tuned and {r.spec for r in tuned} == {spec}
    assert lookup(spec, opencl, path).source == "tuned"


def test_a_layer_with_a_bias_takes_the_plan_tuned_without_one(tmp_path):
    path = tmp_path / "t.db"
    gpu = _gpu()
    _save(path, PLAIN.convolution(), gpu, MWG=32)  # tuned as the built-in models list it: no bias
    for spec in (PLAIN, FUSED, PLAIN.replace(activation="relu6")):
        plan = lookup(spec, gpu, path)
        assert plan.params.MWG == 32 and "the same convolution" in plan.source, spec
