#!/usr/bin/env bash
# Set up, then run the whole test suite (unit + real FLARE simulator and POC tests).
# Extra arguments go to pytest (e.g. -m "not integration" for the fast unit tests only).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q "$@"
status=$?
# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
[ "$status" -eq 5 ] && echo "pytest collected no tests" >&2
exit "$status"
