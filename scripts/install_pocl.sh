#!/usr/bin/env bash
# Install PoCL, the CPU OpenCL driver autoconv uses as its embedded default device, from Debian,
# plus the OpenCL ICD loader's C development files (headers, libOpenCL.so) that the exported-kernel
# C example (examples/c/) builds against. Idempotent: does nothing when all are installed.
# See README "Why Debian's PoCL".
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" install_pocl.sh 1 \
    "install PoCL (or any OpenCL driver) and the OpenCL headers with your package manager" \
    pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev opencl-c-headers
