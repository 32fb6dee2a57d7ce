#!/usr/bin/env bash
# Shared by the install_*.sh scripts: install the Debian packages named after the caller's name
# (used in messages) that are not installed yet, through sudo when not root. Without apt-get it
# prints HINT and exits with MISSING_RC (1: required; 0: the tests that need them skip).
#   bash scripts/apt_install.sh NAME MISSING_RC HINT PACKAGE...
set -euo pipefail
name="$1" missing_rc="$2" hint="$3"
shift 3
missing=""
for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -z "$missing" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$name: no apt-get here; $hint" >&2
    exit "$missing_rc"
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "$name: installed$missing"
