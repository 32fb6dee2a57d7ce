#!/usr/bin/env bash
# Install PoCL, the CPU OpenCL driver autoconv uses as its embedded default device, from Debian,
# plus the OpenCL ICD loader's C development files (headers, libOpenCL.so) that the exported-kernel
# C example (examples/c/) builds against. Idempotent: does nothing when all are installed.
# See README "Why Debian's PoCL".
set -euo pipefail
PACKAGES="pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev opencl-c-headers"
missing=""
for package in $PACKAGES; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -z "$missing" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_pocl.sh: no apt-get here; install PoCL (or any OpenCL driver) and the OpenCL headers with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "install_pocl.sh: installed$missing"
