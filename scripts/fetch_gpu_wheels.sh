#!/usr/bin/env bash
# Download (here, where pip reaches PyPI) the wheels autoconv needs that the GPU machine's image
# lacks, into .whl/ (git-ignored through .git/info/exclude); carry .whl to run scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for package in optuna alembic sqlalchemy colorlog mako sqlite-utils sqlite-fts4 click-default-group platformdirs greenlet; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$package" || python3 -m pip download -q --no-deps --python-version 3.12 \
        --only-binary=:all: -d .whl "$package"
done
ls .whl
