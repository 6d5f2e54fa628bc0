#!/usr/bin/env bash
# Install if needed, then run the main job: a local multi-peer training run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SPARSELOCO_VENV:-.venv}/bin/sparseloco" simulate "$@"
