#!/usr/bin/env bash
# Set up a development environment from a fresh clone: system data packages, .venv, torch, the project.
#
# torch is installed on its own first, pinned, so that pip never resolves an unpinned torch
# (which pulls the newest CUDA build, several GB, even on a CPU-only machine). An existing torch
# is respected: one already in .venv is kept, and one in the base interpreter is reused through
# --system-site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${L0SWEEP_TORCH_SPEC:-torch==2.13.0}
STAMP=.venv/.l0sweep-installed

# apt_install PACKAGE CONSEQUENCE: install a Debian package quietly (apt-get update only if the
# first try fails); say CONSEQUENCE when it cannot be installed.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || { echo "setup: no apt-get for $1; $2" >&2; return 0; }
    local sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
    if ! $sudo apt-get install -y -q "$1" >/dev/null 2>&1; then
        $sudo apt-get update -q >/dev/null 2>&1 || true
        $sudo apt-get install -y -q "$1" >/dev/null 2>&1 \
            || echo "setup: could not install $1; $2" >&2
    fi
}

# Debian data packages (Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    apt_install dataset-fashion-mnist "Fashion-MNIST tests will be skipped"
fi

# PostgreSQL server binaries: MLflow's backend in the lab cluster's smoke test (tests/docker).
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt_install postgresql "the lab cluster's smoke test will be skipped"
fi

# Headless Chromium: the test that opens a sweep's page of the MLflow UI in a real browser.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    apt_install chromium "the MLflow UI browser test will be skipped"
fi

if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "setup: reusing the base interpreter's torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
    exit 0
fi

PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "setup: installing l0sweep[dev]"
"${PIP[@]}" install -e ".[dev]"
touch "$STAMP"
