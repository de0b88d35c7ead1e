#!/usr/bin/env bash
# Create (or reuse) the project's environment in .venv/ at the repo root.
#
# Order matters: CPU torch 2.13.0 first (pip takes the CPU build lying on disk; a plain `torch`
# would pull multi-GB CUDA wheels), then SGLang without its dependencies (its declared deps pull a
# CUDA stack) plus its CPU/pure-Python runtime needs, then megatron-core and this package.
# On a GPU machine install the `gpu` extra instead of relying on this CPU recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP_INPUT=$(cat tools/setup_env.sh tools/requirements-sglang-cpu.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP=$VENV/.megatron-opd-env-$STAMP_INPUT

if [[ -f $STAMP ]]; then
  exit 0  # environment already built from these exact files
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps sglang==0.5.23
"${PIP[@]}" -r tools/requirements-sglang-cpu.txt
"${PIP[@]}" megatron-core==0.16.1 pyyaml matplotlib tensorboard pytest pytest-timeout blake3==1.0.11
"${PIP[@]}" --no-deps -e .
# Guard against a dependency having swapped in a CUDA torch build.
"$VENV/bin/python" - <<'PYCHECK'
import torch, sys
if torch.__version__ != "2.13.0+cpu":
    sys.exit(f"setup_env: expected torch 2.13.0+cpu, got {torch.__version__}")
PYCHECK
rm -f "$VENV"/.megatron-opd-env-*
touch "$STAMP"
echo "setup_env: environment ready in $VENV"
