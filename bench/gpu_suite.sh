#!/usr/bin/env bash
# The prepared GPU check (issue 17): bench/gpu_suite.py with a log. From the repository root:
#   bash bench/gpu_suite.sh              # on a lent GPU machine (docs/gpu.md)
#   bash bench/gpu_suite.sh --dry-run    # on CPU: same code path, CPU-sized shapes, gloo
# The carried wheels (.whl/, from bench/gpu_wheels.sh) are installed by the suite's first part
# into a scratch site directory. The last line of output is one JSON object; with $OUT set (the
# device tool's result folder) the log, the JSON line and each part's log are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ $dry = 1 ] && [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
log=$work/gpu_suite.log
"$py" bench/gpu_suite.py --work "$work" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$log" "$OUT/gpu_suite.log"
  tail -n 1 "$log" > "$OUT/gpu_suite.json"
  for f in learner learner_retry publish receiver fp8 gpu_tests; do
    [ -f "$work/$f.log" ] && cp "$work/$f.log" "$OUT/$f.log"
  done
fi
[ -n "${GPU_SUITE_KEEP:-}" ] || rm -rf "$work"
exit "$rc"
