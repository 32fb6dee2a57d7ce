"""Whole ONNX models: graph preparation and fusion (prepare.py), the operators besides Conv
(ops.py), and the runner (runner.py). The public entry point is `autoconv.onnx.load`."""
