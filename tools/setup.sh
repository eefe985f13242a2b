#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with p2r and its test tools.
# torch/torchvision are pinned to the pair p2r is tested with (any torch >= 2.5 with a matching
# torchvision works; on GPU machines install the CUDA build you need first, then run this).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
echo "p2r installed in $(pwd)/.venv"
