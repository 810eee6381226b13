#!/usr/bin/env python3
"""Runs README.md's W&B and MLflow lines on a tiny model and reads the metrics back (issue #17).

Run by scripts/check_loggers.sh in a throwaway venv that has wandb and mlflow (litpeft does not depend
on either). Each README line (``--trainer.logger WandbLogger --trainer.logger.project my-project``,
``--trainer.logger MLFlowLogger --trainer.logger.tracking_uri sqlite:///mlflow.db``) is taken from
README.md as written, completed with a tiny model and a short run, and run as a user would, in a temp
directory: W&B in offline mode (its local run directory), MLflow with a local SQLite store. The metrics
are read back with each package's own reader and checked at Lightning's log steps; the adapter and
``config.yaml`` must be in ``--trainer.default_root_dir``.

    python scripts/check_loggers.py --workdir WORK --litpeft .venv-loggers/bin/litpeft
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METRICS = ("train/loss", "perf/tokens_per_sec")
# 12 train / 2 val rows (val_fraction 0.1), batch 2: one epoch is 6 steps and ends with a validation
WORDS = "apple river stone cloud maple tiger lemon ocean piano zebra candle forest garden honey"


def readme_line(logger: str) -> list[str]:
    """The arguments after ``litpeft fit ...`` of README.md's line for ``logger``, as written."""
    for line in (REPO / "README.md").read_text().splitlines():
        if f"--trainer.logger {logger} " in line and "litpeft fit ..." in line:
            return shlex.split(line.split("litpeft fit ...", 1)[1].split("#", 1)[0])
    sys.exit(f"README.md has no `litpeft fit ... --trainer.logger {logger}` line")


def fit(litpeft: str, workdir: Path, name: str, args: list[str], steps: int, every: int) -> None:
    """``litpeft fit`` on tiny:llama for ``steps`` optimizer steps, logging every ``every``, plus ``args``."""
    tiny = [
        "--config", str(REPO / "configs" / "lora.yaml"),
        "--model.model", "tiny:llama",
        "--data.train_file", str(workdir / "train.jsonl"),
        "--data.batch_size", "2",
        "--data.max_seq_length", "64",
        "--trainer.precision", "32-true",
        "--trainer.max_epochs", "null",
        "--trainer.max_steps", str(steps),
        "--trainer.log_every_n_steps", str(every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", f"runs/{name}",
    ]  # fmt: skip
    command = [litpeft, "fit", *tiny, *args]
    print("$ litpeft fit ...", shlex.join(args), flush=True)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        sys.exit(f"FAIL: {name}'s README line exited {result.returncode}:\n{result.stderr[-4000:]}")


def wandb_history(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Metric -> [(trainer/global_step, value)] from the offline run's ``.wandb`` log, read by W&B's own
    ``wandb leet inspect --json`` (wandb 0.31 writes no ``wandb-summary.json`` offline and has no Python
    reader of the log; ``wandb.Api`` is online only)."""
    runs = sorted((workdir / "wandb").glob("offline-run-*"))
    if len(runs) != 1:
        sys.exit(f"FAIL: expected one W&B offline run under {workdir / 'wandb'}, found {len(runs)}")
    wandb = [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json"]
    records = subprocess.run([*wandb, str(runs[0])], capture_output=True, text=True, check=True).stdout
    history: dict[str, list[tuple[int, float]]] = {}
    for line in records.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            row = record["history"]["item"]
            for key in METRICS:
                if key in row:
                    history.setdefault(key, []).append((int(row["trainer/global_step"]), float(row[key])))
    summary = json.loads(
        subprocess.run([*wandb, "--summary", str(runs[0])], capture_output=True, text=True, check=True).stdout
    )
    if summary.get("state") != "finished" or summary.get("project") != "my-project":
        sys.exit(f"FAIL: W&B run state {summary.get('state')!r}, project {summary.get('project')!r}")
    for key in METRICS:  # the summary holds each metric's last value
        if not history.get(key) or summary["summary"].get(key) != history[key][-1][1]:
            sys.exit(f"FAIL: W&B summary's {key} ({summary['summary'].get(key)}) is not the history's last")
    return history


def mlflow_run(workdir: Path, tracking_uri: str) -> tuple[Any, Any]:
    """``(MlflowClient, the one finished run)`` at the README's tracking URI."""
    from mlflow.tracking import MlflowClient

    os.chdir(workdir)  # the README's URI is relative to where the fit ran
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("lightning_logs")  # MLFlowLogger's default experiment_name
    if experiment is None:
        sys.exit(f"FAIL: no MLflow experiment `lightning_logs` in {tracking_uri}")
    runs = client.search_runs([experiment.experiment_id])
    if len(runs) != 1 or runs[0].info.status != "FINISHED":
        sys.exit(f"FAIL: expected one finished MLflow run, found {[r.info.status for r in runs]}")
    return client, runs[0]


def mlflow_history(workdir: Path, tracking_uri: str) -> dict[str, list[tuple[int, float]]]:
    """Metric -> [(step, value)] of the run, through ``MlflowClient``."""
    client, run = mlflow_run(workdir, tracking_uri)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in METRICS}
    return {key: sorted((m.step, m.value) for m in metrics) for key, metrics in history.items()}


#: hyperparameters each logger must hold, with configs/lora.yaml's values (as litpeft's config logs them)
PARAMS = {"model/method/r": 16, "optimizer/lr": 0.0002, "trainer/max_steps": None}


def wandb_params(workdir: Path) -> dict[str, object]:
    """The offline run's config, from ``wandb leet inspect --summary --json`` (values may be ``{value: ...}``)."""
    (run,) = sorted((workdir / "wandb").glob("offline-run-*"))
    wandb = [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json"]
    config = json.loads(subprocess.run([*wandb, str(run)], capture_output=True, text=True, check=True).stdout)
    config = config.get("config") or {}
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}


def mlflow_params(workdir: Path, tracking_uri: str) -> dict[str, object]:
    """The run's params (MLflow keeps them as strings)."""
    return dict(mlflow_run(workdir, tracking_uri)[1].data.params)


def check_params(name: str, params: dict[str, object], steps: int) -> None:
    expected = {**PARAMS, "trainer/max_steps": steps}
    got = {key: params.get(key) for key in expected}
    if any(str(got[key]) != str(value) for key, value in expected.items()):
        sys.exit(f"FAIL: {name}'s hyperparameters {got}, expected {expected} ({len(params)} in all)")
    print(f"  {name} hyperparameters: {len(params)}, including {got}")


def check_run_dir(workdir: Path, name: str) -> None:
    """The adapter and config.yaml in ``--trainer.default_root_dir``, nothing in the working directory."""
    run = workdir / "runs" / name
    missing = [p for p in (run / "adapter" / "adapter.safetensors", run / "config.yaml") if not p.is_file()]
    stray = [p for p in (workdir / "adapter", workdir / "config.yaml") if p.exists()]
    if missing or stray:
        sys.exit(f"FAIL: {name}: missing {missing}, written to the working directory {stray}")


def check(name: str, history: dict[str, list[tuple[int, float]]], steps: list[int]) -> None:
    for key in METRICS:
        got = [step for step, _ in history.get(key, [])]
        if got != steps:
            sys.exit(f"FAIL: {name}: {key} at steps {got}, expected {steps}")
        values = ", ".join(f"{step}: {value:.4g}" for step, value in history[key])
        print(f"  {name} {key} (step: value) {values}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--litpeft", default="litpeft")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in WORDS.split()]
    (args.workdir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Lightning logs when (step + 1) % every == 0, under the 0-based step: optimizer steps every, 2 every, ...
    steps = [k - 1 for k in range(args.every, args.steps + 1, args.every)]

    import lightning
    import mlflow
    import wandb

    print(f"wandb {wandb.__version__}, mlflow {mlflow.__version__}, lightning {lightning.__version__}")
    fit(args.litpeft, args.workdir, "wandb", readme_line("WandbLogger"), args.steps, args.every)
    check_run_dir(args.workdir, "wandb")
    check("W&B (offline run)", wandb_history(args.workdir), steps)
    check_params("W&B", wandb_params(args.workdir), args.steps)
    mlflow_line = readme_line("MLFlowLogger")
    fit(args.litpeft, args.workdir, "mlflow", mlflow_line, args.steps, args.every)
    check_run_dir(args.workdir, "mlflow")
    tracking_uri = mlflow_line[mlflow_line.index("--trainer.logger.tracking_uri") + 1]
    check(f"MLflow ({tracking_uri})", mlflow_history(args.workdir, tracking_uri), steps)
    check_params("MLflow", mlflow_params(args.workdir, tracking_uri), args.steps)
    print(
        f"OK: {args.steps} steps, {', '.join(METRICS)} at Lightning's steps {steps} (after optimizer steps "
        f"{[s + 1 for s in steps]}) read back from W&B's offline run and from MLflow ({tracking_uri}), with the config as "
        "hyperparameters; adapter and config.yaml in --trainer.default_root_dir"
    )


if __name__ == "__main__":
    main()
