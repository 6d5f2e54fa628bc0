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
# The Bittensor SDK, so the chain adapter's tests run against it: wheels only (about 15 s),
# and it leaves the torch, numpy and triton pins above as they are.
"$venv/bin/pip" install -q --only-binary=:all: -e ".[bittensor]"
rm -f "$venv"/.installed-*
touch "$stamp"
