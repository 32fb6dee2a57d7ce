"""The examples stay runnable: the ResNet bottleneck block (examples/resnet_block.py) chained on
the device, with host round trips and through onnxruntime, all equal to the float64 reference."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet_block.py"


def test_the_resnet_block_example_runs_and_agrees_with_onnxruntime(opencl):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run = subprocess.run([sys.executable, str(EXAMPLE), "--size", "12", "--rounds", "1", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("relative error") == 3 and "(< 1e-04: yes)" in run.stdout


def test_the_resnet_block_example_chains_on_the_device(opencl):
    import numpy as np

    import autoconv

    spec = importlib.util.spec_from_file_location("resnet_block", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    weights = example.BlockWeights.random(channels=32, width=8, seed=3)
    x = np.random.default_rng(2).standard_normal((2, 32, 9, 9)).astype(np.float32)
    layers = example.autoconv_block(weights)
    chained = example.run_chained(layers, autoconv.to_device(x))
    expected = example.reference_block(weights, x)
    assert example.relative_error(chained, expected) < example.TOLERANCE
    assert example.relative_error(example.run_round_trips(layers, x), expected) < example.TOLERANCE


def test_the_resnet_block_example_without_its_extras_says_so_in_one_line(tmp_path):
    """After only the README's main install (no onnx, no onnxruntime): one line naming the fix."""
    blocker = tmp_path / "sitecustomize.py"  # onnx and onnxruntime made unimportable for the child
    blocker.write_text("import importlib.abc, sys\n"
                       "class Block(importlib.abc.MetaPathFinder):\n"
                       "    def find_spec(self, name, path=None, target=None):\n"
                       "        if name.split('.')[0] in ('onnx', 'onnxruntime'):\n"
                       "            raise ModuleNotFoundError(name)\n"
                       "sys.meta_path.insert(0, Block())\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "pip install '.[bench]'" in run.stderr
