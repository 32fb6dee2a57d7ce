#!/usr/bin/env bash
# Install PoCL, the CPU OpenCL driver autoconv uses as its embedded default device, from Debian.
# Idempotent: does nothing when it is already installed. See README "Why Debian's PoCL".
set -euo pipefail
if dpkg -s pocl-opencl-icd >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_pocl.sh: no apt-get here; install PoCL (or any OpenCL driver) with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends pocl-opencl-icd ocl-icd-libopencl1 >/dev/null
echo "install_pocl.sh: installed $(dpkg-query -W -f='${Package} ${Version}' pocl-opencl-icd)"
