#!/usr/bin/env bash
# Set up, then run the whole test suite (unit + real FLARE simulator and POC tests).
# Extra arguments go to pytest (e.g. -m "not integration" for the fast unit tests only;
# -n 0 runs everything in one process).
# Two pytest-xdist workers, a test file per worker at a time (its module fixtures, e.g. one
# POC system, stay in one process): the FLARE tests spend most of their time waiting on
# processes and heartbeats, so two workers nearly halve the wall time on two cores.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q -n "${HOSPITAL_FL_TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
[ "$status" -eq 5 ] && echo "pytest collected no tests" >&2
exit "$status"
