"""What the CLI prints: machine-readable output with documented keys, complete tables at 80
columns and when piped, literal strings, no compiler chatter, plots of the promised size, the
explain report, hints, and --version."""

import csv
import io
import json
import shlex
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from autoconv.backends.compiler_output import captured_stderr
from autoconv.cli import app
from autoconv.cli.output import Field, print_table
from autoconv.layers import parse_layer
from rich.console import Console

runner = CliRunner()
SMALL = "n=1,c=8,h=12,w=12,k=16,r=3,s=3,pad=1"
POINTWISE = "n=1,c=8,h=10,w=10,k=8,r=1,s=1"
NARROW = {"COLUMNS": "80"}

# The documented keys of each command's --json records (README, "Machine-readable output").
RUN_KEYS = {"layer", "shape", "device", "algorithm", "plan", "plan_source", "ms", "repeats", "gflops", "rel_error",
            "limit", "verified"}
COMPARE_KEYS = {"layer", "shape", "method", "algorithm", "plan", "ms", "gflops", "vs_direct", "extra_mib",
                "extra_vs_input", "rel_error", "verified", "served", "traffic_bytes", "intensity", "layout", "reorder_ms"}
TUNE_KEYS = {"layer", "shape", "trials", "fastest", "fastest_ms", "best_generated", "best_generated_ms", "vs_default",
             "baseline_ms", "vs_baseline", "failed", "wall_s", "seeded", "ranked", "raced", "carried_from",
             "trials_by_algorithm"}
DEVICE_KEYS = {"index", "platform", "device", "type", "driver", "compute_units", "local_mem_kib", "max_work_group",
               "host_memory", "usable", "default", "problem"}
LIST_KEYS = {"device", "layer", "key", "algorithm", "served", "ms", "spread", "repeats", "gflops", "vs_default",
             "vs_baseline", "trials", "params", "templates", "note"}
SHOW_KEYS = {"device", "layer", "algorithm", "rank", "status", "ms", "spread", "repeats", "rel_error", "measured", "best",
             "params"}


def invoke(*args, env=None):
    result = runner.invoke(app, list(args), env=env or NARROW)
    assert result.exit_code == 0, result.output
    return result


def no_cut_cells(text: str) -> None:
    assert "…" not in text, text


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """A small database tuned once for the module (through the CLI, as a user would)."""
    path = tmp_path_factory.mktemp("tuned") / "weird [bold] [/] dir" / "tuning.db"
    path.parent.mkdir(parents=True)
    result = runner.invoke(app, ["tune", SMALL, POINTWISE, "--trials", "4", "--repeats", "2", "--db", str(path),
                                 "--json"], env={**NARROW, "AUTOCONV_SHIPPED_DB_DIR": ""})
    assert result.exit_code == 0, result.output
    return path, result


def test_version():
    from autoconv import __version__

    assert invoke("--version").stdout.strip() == f"autoconv {__version__}"


def test_tune_json_has_the_documented_keys_and_the_path_printed_literally(opencl, tuned_db):
    path, result = tuned_db
    records = json.loads(result.stdout)
    assert len(records) == 2 and all(set(r) == TUNE_KEYS for r in records)
    # At most the budget: a layer where no tunable algorithm comes within 2x of the best stops early.
    assert all(isinstance(r["fastest_ms"], float) and 1 <= r["trials"] <= 4 for r in records)
    assert str(path) in result.stderr  # "tuning 2 layer(s) into <path>": [bold] and [/] are text
    assert "warning generated" not in result.stderr and "warnings generated" not in result.stderr


def test_db_list_and_show_as_json_csv_and_narrow_tables(opencl, tuned_db):
    path, _ = tuned_db
    listed = json.loads(invoke("db", "list", "--db", str(path), "--json").stdout)
    assert listed and all(set(r) == LIST_KEYS for r in listed)
    assert sum(r["served"] for r in listed) == 2 and all(isinstance(r["ms"], float) for r in listed)
    rows = list(csv.DictReader(io.StringIO(invoke("db", "list", "--db", str(path), "--csv").stdout)))
    assert len(rows) == len(listed) and {"layer", "algorithm", "ms", "spread"} <= set(rows[0])
    table = invoke("db", "list", "--db", str(path)).stdout
    no_cut_cells(table)
    assert all(line == line.rstrip() or len(line) <= 80 for line in table.splitlines())
    shown = json.loads(invoke("db", "show", SMALL, "--db", str(path), "--top", "2", "--json").stdout)
    assert shown and all(set(r) == SHOW_KEYS for r in shown)
    assert max(r["rank"] for r in shown) <= 2 and any(r["best"] for r in shown)
    assert any(isinstance(r["spread"], float) for r in shown if r["status"] == "ok")
    narrow = invoke("db", "show", SMALL, "--db", str(path), "--top", "3").stdout
    no_cut_cells(narrow)
    assert "measured configs" in narrow and "params" in narrow


def test_run_and_compare_json_and_the_compare_rollup(opencl, tuned_db):
    path, _ = tuned_db
    run = json.loads(invoke("run", SMALL, "--repeats", "2", "--db", str(path), "--json").stdout)
    assert len(run) == 1 and set(run[0]) == RUN_KEYS and run[0]["verified"] is True
    assert run[0]["plan_source"] == "tuned"
    compared = json.loads(invoke("compare", SMALL, POINTWISE, "--repeats", "2", "--db", str(path), "--json").stdout)
    assert set(compared) == {"device", "measurements", "rollup", "served"}
    assert all(set(r) == COMPARE_KEYS for r in compared["measurements"])
    algorithms = {r["algorithm"] for r in compared["measurements"] if r["layer"] == parse_layer(SMALL).label}
    assert {"im2col_gemm", "implicit_gemm", "winograd", "direct", "im2col_blas"} <= algorithms
    rollup = {r["algorithm"]: r for r in compared["rollup"]}
    assert rollup["winograd"]["layers"] == 1 and rollup["im2col_gemm"]["layers"] == 2
    assert sum(r["served_on"] for r in rollup.values()) == 2 and len(compared["served"]) == 2
    table = invoke("compare", SMALL, POINTWISE, "--repeats", "2", "--db", str(path)).stdout
    no_cut_cells(table)
    assert "all 2 layers" in table and "geomean" in table


def test_explain_names_the_served_plan_and_why(opencl, tuned_db, tmp_path):
    path, _ = tuned_db
    report = invoke("explain", SMALL, "--db", str(path), "--repeats", "2", "--html", str(tmp_path / "e.html")).stdout
    assert "served: " in report and "(tuned)" in report and "why: the fastest of" in report
    assert "FLOP/byte" in report and "GB/s copy" in report
    html = (tmp_path / "e.html").read_text()
    assert "served: " in html and "data:image/png;base64," in html


def test_compare_plot_is_a_png_of_the_promised_size(opencl, tmp_path):
    from matplotlib import image

    target = tmp_path / "cmp.png"
    out = invoke("compare", SMALL, "--repeats", "2", "--plot", str(target)).stdout
    assert f"plot written to {target}" in out
    assert target.stat().st_size > 10_000
    assert image.imread(str(target)).shape[:2] == (600, 1400)


def test_db_plot_draws_tuning_curves(opencl, tmp_path):
    from matplotlib import image

    # One algorithm alone gets every trial (no faster baseline to fall behind), so it has a curve.
    path = tmp_path / "curves.db"
    tuned = runner.invoke(app, ["tune", SMALL, "--algorithm", "implicit_gemm", "--trials", "4", "--repeats", "2",
                                "--db", str(path)], env={"AUTOCONV_SHIPPED_DB_DIR": ""})
    assert tuned.exit_code == 0, tuned.output
    target = tmp_path / "curves.png"
    assert "curve(s) written" in invoke("db", "plot", str(target), "--db", str(path)).stdout
    assert image.imread(str(target)).shape[:2] == (600, 1000)


def test_a_bad_plot_name_is_refused_before_measuring(tmp_path):
    result = runner.invoke(app, ["compare", SMALL, "--plot", str(tmp_path / "cmp.gif")])
    assert result.exit_code == 2 and "must end in .png or .svg" in result.output


def test_an_untuned_layer_gets_a_hint_with_the_command(opencl):
    result = invoke("run", SMALL, "--repeats", "1")
    assert "hint:" in result.stderr and f"autoconv tune {shlex.quote(SMALL)}" in result.stderr
    named = invoke("run", "resnet50/res5_3x3", "--batch", "2", "--repeats", "1").stderr.replace("\n", "")
    assert "autoconv tune resnet50/res5_3x3 --batch 2" in named


def test_devices_json_and_csv(opencl):
    devices = json.loads(invoke("devices", "--json").stdout)
    assert devices and all(set(d) == DEVICE_KEYS for d in devices) and sum(d["default"] for d in devices) == 1
    assert next(csv.reader(io.StringIO(invoke("devices", "--csv").stdout)))[0] == "index"
    result = runner.invoke(app, ["devices", "--json", "--csv"])
    assert result.exit_code == 2 and "choose one of --json and --csv" in result.output


def test_tables_never_cut_a_cell_at_any_width():
    fields = [Field("name", "layer name"), Field("value", "a long header", numeric=True), Field("note", "note")]
    records = [{"name": "resnet50/res4_3x3 n=8", "value": 12.5, "note": "a [bold] note with [/] markup"}]
    for width in (200, 60, 30, 12):
        stream = io.StringIO()
        print_table(Console(file=stream, width=width, markup=False), "title", fields, records)
        text = stream.getvalue()
        assert "…" not in text and "resnet50/res4_3x3" in text.replace("\n", "").replace(" ", "")
        assert "[bold]" in text and "[/]" in text


def test_compiler_output_is_captured_not_printed():
    with captured_stderr() as said:
        os.write(2, b"1 warning generated.\n")
    assert said == ["1 warning generated.\n"]


def test_a_fresh_compile_prints_no_compiler_chatter(opencl, tmp_path):
    """A real process with PoCL's kernel cache empty, so every kernel is built (and may warn)."""
    env = {**os.environ, "POCL_CACHE_DIR": str(tmp_path / "pocl"), "AUTOCONV_SHIPPED_DB_DIR": "", "COLUMNS": "80"}
    run = subprocess.run([sys.executable, "-m", "autoconv.cli", "compare", SMALL, "--repeats", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "generated" not in run.stderr and "warning:" not in run.stderr.replace("hint:", ""), run.stderr
