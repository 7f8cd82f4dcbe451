#!/usr/bin/env bash
# Creates .venv and installs diffstyler with the versions in constraints.txt, with the test tools
# (dev: torchao and gguf included, for the quantized-transformer tests), the Gradio page (demo) and
# the documentation site (docs: MkDocs Material, mkdocstrings). bitsandbytes (nf4, CUDA only) is in
# the quant extra: .venv/bin/pip install -c constraints.txt -e '.[quant]'
# torch 2.14.1 + torchvision 0.29.1: torchvision must match torch exactly (ultralytics imports it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,demo,docs]"
.venv/bin/python -c "import importlib.util, diffstyler, torch, torchvision; assert all(importlib.util.find_spec(m) for m in ('ultralytics', 'gradio', 'playwright', 'mkdocs', 'mkdocstrings', 'torchao', 'gguf')); print('diffstyler ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
