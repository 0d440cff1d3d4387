#!/usr/bin/env bash
# Set-up for `make book` and `make test` (hand-written plumbing).
# Creates .venv if missing (seeing the system's packages, so an existing torch, e.g. Colab's, is
# kept), installs torch==2.13.0 only when no torch is importable, then everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --progress-bar off torch==2.13.0
fi
.venv/bin/pip install --progress-bar off -r requirements.txt
.venv/bin/python -c "import torch, qlora_mini; print('torch', torch.__version__, '| qlora_mini', qlora_mini.__version__)"
