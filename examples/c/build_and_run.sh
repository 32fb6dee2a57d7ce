#!/usr/bin/env bash
# Build run_layer.c against an export directory's autoconv_kernels.h and run every layer in it.
#   bash examples/c/build_and_run.sh EXPORT_DIR [LAYER_NAME]
set -euo pipefail
export_dir="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
binary="$(mktemp -d)/run_layer"
gcc -std=c99 -O2 -Wall -Wextra -I "$export_dir" "$here/run_layer.c" -lOpenCL -lm -o "$binary"
"$binary" "$export_dir" "$@"
