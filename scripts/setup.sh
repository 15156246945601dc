#!/usr/bin/env bash
# bash scripts/setup.sh [--test]
# Installs lora_lab on a fresh machine. torch comes first, pinned: 2.13.0 is a CPU wheel on these machines' local disk
# (elsewhere pip fetches it from PyPI), and any open torch range would pull a multi-GB CUDA build. With torch in
# place, the package's own "torch>=2.3" is already satisfied and installs nothing more. --test adds the test extra
# (pytest, peft for the interoperability tests) and the PostgreSQL server the scale-out tests start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extra=""
if [[ "${1:-}" == "--test" ]]; then
  extra="[test]"
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || echo "setup: could not install postgresql; the scale-out tests will be skipped" >&2
  fi
  # Headless Chromium for the MLflow UI browser test (tests/test_mlflow_ui.py); best effort, never fails setup.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium; the MLflow browser test will be skipped" >&2
  fi
fi
"$PY" -m pip install --quiet -e ".${extra}"
