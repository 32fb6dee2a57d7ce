#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for the distributed-tuning tests, which start a
# throwaway server on localhost from a fixture (tests/test_distributed.py). The packaged cluster
# is not used. Idempotent: does nothing when the server binaries are installed.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgresql.sh: no apt-get here; install a PostgreSQL server with your package manager (the distributed-tuning tests skip without one)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
echo "install_postgresql.sh: installed postgresql"
