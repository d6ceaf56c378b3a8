#!/usr/bin/env bash
# Create ./.venv and install hospital_fl with everything it needs.
#   CPU machines (default): the CPU build of torch 2.13.0.
#   Hospital GPU servers:   HOSPITAL_FL_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "hospital_fl needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${HOSPITAL_FL_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q ".[test]"
# Headless Chromium renders `hospital-fl status --html` pages in the tests (they skip without it).
# Debian/Ubuntu as root only; elsewhere install a chromium yourself or let that test skip.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "chromium could not be installed; the status page screenshot test will skip"
fi
echo "hospital_fl installed in $(pwd)/.venv"
