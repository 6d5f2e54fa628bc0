#!/usr/bin/env bash
# Create .venv and install the project with its test dependencies (skipped when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SPARSELOCO_VENV:-.venv}"
stamp="$venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
python3 -m venv "$venv"
# The CPU build of torch first: an open version range would pull a multi-GB CUDA build.
"$venv/bin/pip" install -q torch==2.13.0
# Triton runs the GPU kernels' parity tests on the CPU through its interpreter;
# triton 3.6 needs numpy < 2.4 there.
"$venv/bin/pip" install -q "numpy<2.4" "triton==3.6.0"
"$venv/bin/pip" install -q -e ".[dev]"
rm -f "$venv"/.installed-*
touch "$stamp"
