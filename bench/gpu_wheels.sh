#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the lent GPU machines lack (docs/gpu.md) into .whl/
# (git-ignored; carried with `carry: [".whl"]`): megatron-core and pyzmq for CPython 3.12 on
# x86-64 Linux. Their other needs (torch, numpy, packaging; pyzmq: none) are already on those
# machines, so --no-deps. bench/gpu_suite.sh installs them there into a scratch site directory.
# The device tool carries at most 64 MiB with the working tree: this checks the total.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
PINS=("megatron-core==0.16.1" "pyzmq==27.3.0")  # the versions the CPU environment tests
mkdir -p .whl
rm -f .whl/*.whl
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${PINS[@]}"
total=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
echo "wheels in .whl/: $(ls .whl) ($((total / 1024)) KiB)"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "gpu_wheels: $((total / 1048576)) MiB of wheels leaves too little of the 64 MiB the device tool carries" >&2
  exit 1
fi
