#!/usr/bin/env bash
# Build the wheel (not editable), install it into a fresh venv, and run a convolution from it:
# proves the wheel carries the templates and the model lists.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --no-deps -q -w "$work/dist" "$root"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/autoconv-*.whl
cd "$work"  # away from the checkout, so only the installed wheel can be imported
"$work/venv/bin/python" - <<'PY'
import numpy as np
import autoconv
from autoconv.render import template_dir
assert "site-packages" in str(template_dir()), template_dir()
x = np.random.default_rng(0).uniform(0.5, 1.5, (1, 8, 12, 12)).astype(np.float32)
w = np.random.default_rng(1).uniform(0.5, 1.5, (16, 8, 3, 3)).astype(np.float32)
y = autoconv.conv2d(x, w, padding=1)
ref = autoconv.conv2d(x, w, padding=1, backend="numpy")
err = float(np.abs(y - ref).max() / np.abs(ref).max())
assert err < 1e-4, err
print(f"wheel OK: templates from {template_dir()}, relative error {err:.1e}")
PY
"$work/venv/bin/autoconv" run resnet50/res5_3x3 --repeats 2
