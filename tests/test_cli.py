"""The CLI through typer's runner: every command documented, bad input one line and exit 2."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoconv.cli import app

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert re.search(rf"autoconv {name}\b", README.read_text()), f"README does not document `autoconv {name}`"


def test_devices_lists_the_default_device(opencl):
    result = runner.invoke(app, ["devices"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert opencl.device.name in result.output and "default" in result.output and "yes" in result.output


def test_compare_prints_all_three_methods_verified(opencl):
    result = runner.invoke(app, ["compare", "n=1,c=8,h=12,w=12,k=16,r=3,s=3,pad=1", "--repeats", "2"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for method in ("direct loops", "im2col + numpy BLAS", "im2col + generated GEMM"):
        assert method in result.output
    assert "WRONG" not in result.output
    im2col_row = next(line for line in result.output.splitlines() if line.startswith("│ im2col_blas "))
    assert "9.0x" in im2col_row  # a 3x3 stride-1 im2col is nine times its input


def test_run_checks_against_the_reference(opencl):
    result = runner.invoke(app, ["run", "resnet50/res5_3x3", "--batch", "1", "--repeats", "2"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output and "GFLOP/s" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "resnet50/nope"], "has no layer"),
        (["run", "lenet/conv1"], "not built in"),
        (["run", "c=3,h=2,w=2,k=4,r=5,s=5"], "output size"),
        (["run", "c=3,h=x"], "must be an int"),
        (["run", "c=3,h=8"], "missing"),
        (["compare", "n=1,c=4,h=8,w=8,k=4,r=3,s=3", "--device", "99"], "device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, opencl):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_compare_without_a_layer_is_a_usage_error():
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 2
