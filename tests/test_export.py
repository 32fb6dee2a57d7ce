"""`autoconv export`: standalone, deterministic sources + manifest + C header, a plain C program
that runs them on PoCL against autoconv's reference data, and clear refusals of bad input."""

import filecmp
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoconv import ConvSpec, default_gemm_params, get_algorithm
from autoconv.cli import app
from autoconv.render import template_hash
from autoconv.store import SQLiteStore, TunedResult

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c" / "build_and_run.sh"
TUNED = ConvSpec(2, 6, 9, 7, 10, 3, 3, padding=1, groups=2, bias=True)
UNTUNED = "n=1,c=8,h=10,w=10,k=12,r=1,s=1,stride=2"
ASYMMETRIC = "n=1,c=4,h=7,w=6,k=5,r=2,s=2,pad=0,pad_bottom=1,pad_right=1"  # torch's "same" for a 2x2 kernel


@pytest.fixture
def tuned_db(opencl, tmp_path):
    path = tmp_path / "tuned.db"
    with SQLiteStore(path) as db:
        db.record_device(opencl.device)
        db.save_result(TunedResult(
            device=opencl.device.fingerprint(), spec=TUNED, algorithm="im2col_gemm", template_hash=template_hash(),
            params=default_gemm_params(MWG=16, NWG=32, WPTM=4, WPTN=8, VWN=4, SA=1, SB=1, KWG=8, IM2COL_ROWS=1),
            median_ms=1.0, gflops=1.0, rel_error=1e-6, default_ms=1.5, trials=3))
    return path


def export(db, out, *args):
    return runner.invoke(app, ["export", "--db", str(db), "--out", str(out), *args], env={"COLUMNS": "250"})


def test_exported_sources_are_self_contained_and_described(tuned_db, tmp_path):
    out = tmp_path / "out"
    result = export(tuned_db, out, "--all", UNTUNED)
    assert result.exit_code == 0, result.output
    assert "not tuned" in result.output and "fallback" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template_hash"] == template_hash() and manifest["language"] == "opencl"
    layers = {layer["key"]: layer for layer in manifest["layers"]}
    tuned = layers[TUNED.key()]
    assert tuned["tuned"] and tuned["params"]["MWG"] == 16 and tuned["buffers"]["scratch"] > 0
    assert [k["entry"] for k in tuned["kernels"]] == ["im2col", "gemm_conv"]
    assert [a["name"] for a in tuned["kernels"][1]["args"]][:4] == ["A", "B", "bias", "out"]
    fallback = next(layer for key, layer in layers.items() if key != TUNED.key())
    assert not fallback["tuned"]
    for kernel_file in out.glob("*.cl"):
        text = kernel_file.read_text()
        assert "#include" not in text
        assert text.startswith("/*\n * autoconv ") and "params  " in text and "device  " in text
    header = (out / "autoconv_kernels.h").read_text()
    assert "AUTOCONV_NUM_LAYERS 2" in header and TUNED.key() in header


def test_the_same_database_exports_byte_identical_files(tuned_db, tmp_path):
    assert export(tuned_db, tmp_path / "a", "--all", "--reference").exit_code == 0
    assert export(tuned_db, tmp_path / "b", "--all", "--reference").exit_code == 0
    comparison = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for name in comparison.common_files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Exporting again over an earlier export replaces it whole.
    assert export(tuned_db, tmp_path / "a", UNTUNED).exit_code == 0
    assert len(json.loads((tmp_path / "a" / "manifest.json").read_text())["layers"]) == 1
    assert not (tmp_path / "a" / "reference").exists()


@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/CL/cl.h").exists(),
                    reason="needs gcc and the OpenCL headers (scripts/install_pocl.sh installs them)")
def test_a_plain_c_program_runs_the_export_and_matches_the_reference(tuned_db, tmp_path):
    out = tmp_path / "out"
    assert export(tuned_db, out, "--all", UNTUNED, ASYMMETRIC, "--reference").exit_code == 0
    run = subprocess.run(["bash", str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("-> OK") == 3 and "MISMATCH" not in run.stdout


@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/CL/cl.h").exists(),
                    reason="needs gcc and the OpenCL headers (scripts/install_pocl.sh installs them)")
@pytest.mark.parametrize("algorithm", ["implicit_gemm", "winograd", "direct"])
def test_every_algorithm_with_kernels_exports_and_runs_from_c(opencl, tmp_path, algorithm):
    path = tmp_path / "alg.db"
    spec = ConvSpec(2, 6, 9, 7, 10, 3, 3, padding=1, groups=2, bias=True)
    with SQLiteStore(path) as db:
        db.record_device(opencl.device)
        db.save_result(TunedResult(
            device=opencl.device.fingerprint(), spec=spec, algorithm=algorithm, template_hash=template_hash(),
            params=get_algorithm(algorithm).heuristic(spec, opencl.device), median_ms=1.0, gflops=1.0,
            rel_error=1e-6, default_ms=None, trials=1))
    out = tmp_path / "out"
    assert export(path, out, "--all", "--reference").exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"][0]["algorithm"] == algorithm
    once = [k["entry"] for k in manifest["layers"][0]["kernels"] if k["once_per_weights"]]
    assert once == (["winograd_filter"] if algorithm == "winograd" else [])
    run = subprocess.run(["bash", str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.count("-> OK") == 1, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/CL/cl.h").exists(),
                    reason="needs gcc and the OpenCL headers (scripts/install_pocl.sh installs them)")
def test_a_channel_blocked_layer_exports_with_its_layout_and_runs_from_c(opencl, tmp_path):
    """The layout in the manifest and the C header; the reference data in NCHW8c (the padding
    channels included: 20 input and 12 output channels in blocks of 8), checked by the C program."""
    path = tmp_path / "blocked.db"
    spec = ConvSpec(1, 20, 7, 6, 12, 3, 3, padding=1, bias=True, activation="relu", layout="NCHW8c")
    with SQLiteStore(path) as db:
        db.record_device(opencl.device)
        db.save_result(TunedResult(
            device=opencl.device.fingerprint(), spec=spec, algorithm="blocked_direct", template_hash=template_hash(),
            params=get_algorithm("blocked_direct").heuristic(spec, opencl.device), median_ms=1.0, gflops=1.0,
            rel_error=1e-6, default_ms=None, trials=1))
    out = tmp_path / "out"
    assert export(path, out, "--all", "--reference").exit_code == 0
    layer = json.loads((out / "manifest.json").read_text())["layers"][0]
    assert layer["shape"]["layout"] == "NCHW8c" and layer["key"].endswith("_NCHW8c_actrelu")
    assert layer["buffers"]["input"] == 1 * 3 * 7 * 6 * 8 * 4 and layer["buffers"]["output"] == 1 * 2 * 7 * 6 * 8 * 4
    assert '"NCHW8c", 8,' in (out / "autoconv_kernels.h").read_text()
    run = subprocess.run(["bash", str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "NCHW8c, 3 kernel(s)" in run.stdout and "-> OK" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("case", ["missing", "foreign", "empty", "out_is_a_file", "out_not_an_export", "no_layers",
                                  "unknown_device"])
def test_bad_input_gets_a_clear_message_and_nothing_half_written(case, tuned_db, tmp_path):
    db, out, args = tuned_db, tmp_path / "out", ["--all"]
    expected = {"missing": "does not exist", "foreign": "not an autoconv tuning database", "empty": "holds no result",
                "out_is_a_file": "cannot write", "out_not_an_export": "not an earlier autoconv export",
                "no_layers": "--model or --all", "unknown_device": "devices in"}[case]
    if case == "missing":
        db = tmp_path / "absent.db"
    elif case == "foreign":
        db = tmp_path / "foreign.db"
        sqlite3.connect(db).execute("create table cats (name text)").connection.commit()
    elif case == "empty":
        db = tmp_path / "empty.db"
        SQLiteStore(db).close()
    elif case == "out_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "out_not_an_export":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    elif case == "no_layers":
        args = []
    elif case == "unknown_device":
        args = ["--all", "--device", "no such device"]
    result = export(db, out, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    if case == "out_not_an_export":
        assert (out / "precious.txt").read_text() == "keep me"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_an_interrupted_export_leaves_nothing(tuned_db, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Path.write_text

    def failing_write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write)
    result = export(tuned_db, tmp_path / "out", "--all")
    assert result.exit_code == 130
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
