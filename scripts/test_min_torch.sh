#!/usr/bin/env bash
# The oldest torch the project declares (pyproject.toml: "torch>=X"), checked: a second venv
# with exactly torch X, the project installed in it, and the tests of what needs a recent torch
# (the optimizers, named parameters, DDP/FSDP2 under torchrun, joining). Extra arguments go to
# pytest. PyPI's Linux wheel of torch X is its CUDA build, and it does not import without its
# nvidia-* libraries even on a machine without a GPU, so they come along (about 2.5 GB of
# downloads, 5.5 GB installed); the venv is reused while pyproject.toml and this script do not
# change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SPARSELOCO_MIN_TORCH_VENV:-.venv-min-torch}"
min=$(python3 -c 'import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.fullmatch(r"torch>=([\d.]+)", d).group(1) for d in deps if d.startswith("torch")))')
stamp="$venv/.installed-$(cat pyproject.toml scripts/test_min_torch.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$min"
    "$venv/bin/pip" install -q -e ".[dev]"
    touch "$stamp"
fi
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$min'), torch.__version__"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/sparseloco \
    tests/netcomm/test_join.py tests/examples/test_torchrun_miner.py "$@"
