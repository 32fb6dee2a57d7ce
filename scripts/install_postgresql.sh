#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for the distributed-tuning tests, which start a
# throwaway server on localhost from a fixture (tests/test_distributed.py). The packaged cluster
# is not used. Idempotent: does nothing when the server binaries are installed.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
    exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" install_postgresql.sh 0 \
    "install a PostgreSQL server with your package manager (the distributed-tuning tests skip without one)" \
    postgresql
