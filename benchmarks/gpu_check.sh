#!/usr/bin/env bash
# The one-call GPU check: install ehrjax against the machine's JAX, then run benchmarks/gpu_check.py (its
# docstring says what it measures). Writes gpu_check.json and logs to --out (default $OUT, else ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget-s S]
#
# --dry-run: the same steps on the CPU at smoke size, no install step.
#
# Install step (GPU runs): `pip install --no-deps -e .` against the JAX already installed (falling back to this
# checkout on PYTHONPATH when the editable install cannot be built offline), after installing, from wheels/
# (ignored by git), the packages the machine lacks among ml_collections, absl-py, PyYAML and safetensors. Fill
# wheels/ on a machine with network access, for the GPU machine's Python version (3.12 here as an example):
#
#   pip download ml_collections absl-py PyYAML safetensors -d wheels --no-deps --only-binary=:all: \
#       --python-version 3.12 --platform manylinux2014_x86_64
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
DRY_RUN=0
OUT_DIR="${OUT:-./gpu_check_out}"
PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) [[ $# -ge 2 ]] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT_DIR="$2"; shift 2 ;;
    --budget-s) [[ $# -ge 2 ]] || { echo "error: --budget-s needs seconds" >&2; exit 2; }; PASS+=(--budget-s "$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (expected --dry-run, --out DIR, --budget-s S)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

INSTALL="skipped (dry run)"
if [[ $DRY_RUN -eq 0 ]]; then
  LOG="$OUT_DIR/install.log"
  : >"$LOG"
  # Distributions whose module does not import here.
  MISSING="$("$PYTHON" - <<'PY'
import importlib.util
wanted = {"ml_collections": "ml_collections", "absl": "absl-py", "yaml": "PyYAML", "safetensors": "safetensors"}
print(" ".join(dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None))
PY
)"
  INSTALL="missing: ${MISSING:-none}"
  if [[ -n "$MISSING" ]]; then
    # shellcheck disable=SC2086
    if "$PYTHON" -m pip install --no-index --no-deps --find-links wheels $MISSING >>"$LOG" 2>&1; then
      INSTALL="$INSTALL; installed from wheels/"
    else
      INSTALL="$INSTALL; NOT installed from wheels/ (see install.log)"
      echo "gpu_check: could not install $MISSING from wheels/ (see $LOG); the steps that need them will fail" >&2
    fi
  fi
  if "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    INSTALL="$INSTALL; ehrjax installed (editable)"
  else
    INSTALL="$INSTALL; editable install failed (see install.log), running from the checkout on PYTHONPATH"
  fi
fi

EXTRA=()
[[ $DRY_RUN -eq 1 ]] && EXTRA+=(--dry-run)
set +e
"$PYTHON" benchmarks/gpu_check.py ${EXTRA[@]+"${EXTRA[@]}"} ${PASS[@]+"${PASS[@]}"} --out "$OUT_DIR" --install "$INSTALL" \
  2>&1 | tee "$OUT_DIR/gpu_check.log"
STATUS=${PIPESTATUS[0]}
set -e
exit "$STATUS"
