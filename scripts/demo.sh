#!/usr/bin/env bash
# Set up, then run the main job: federated pneumonia detection on the embedded chest X-rays.
# Extra arguments go to `hospital-fl demo` (e.g. --poc, --rounds 5, --out results).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hospital-fl demo "$@"
