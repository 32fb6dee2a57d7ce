#!/usr/bin/env bash
# Install what the CUDA simulator (a test double: autoconv/testing/cuda_simulator.py) needs to run
# the rendered CUDA kernels on the CPU: g++ with OpenMP (libgomp) and AddressSanitizer (libasan),
# and binutils' objdump. Idempotent: does nothing when all are installed.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" install_cuda_sim.sh 1 \
    "install g++ with OpenMP and AddressSanitizer with your package manager" \
    g++ libgomp1 libasan8 binutils
