"""DPO on 2 CPU processes (gloo) equals one process with the same global batch: DDP, and FSDP with the
reference cache (the launch and the fit are tests/distributed_worker.py's, as for SFT).

A pair is one item of the dataset, so the sampler hands a pair's chosen and rejected rows to the same rank
(rank r gets pairs r, r+2, ... of the shuffled order); the loss and reward metrics are means over every
rank's pairs (``sync_dist``), so the logged values equal one process's too.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from preference_distributed_worker import fit_dpo
from test_distributed import adapter, assert_same_adapter

# Starts its own processes on fixed world sizes and times collectives: `make test` runs it alone, not on the xdist workers.
pytestmark = pytest.mark.serial

WORKER = Path(__file__).parent / "preference_distributed_worker.py"


def write_pairs(directory: Path) -> None:
    """Answers of different lengths: the ranks' halves of a batch carry different numbers of tokens."""
    rng = random.Random(0)
    words = ["alpha", "gamma", "delta", "omega", "sigma", "theta", "kappa"]

    def row() -> dict[str, str]:
        good = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        return {
            "prompt": "Say some words: " + good,
            "chosen": good,
            "rejected": " ".join(rng.sample(words, 3)),
        }

    directory.mkdir(parents=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(8)))
    (directory / "val.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(4)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_dpo")
    write_pairs(out / "pairs")
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    fit_dpo(out, "single_dpo", "auto", 1, 4)
    return out


def _metrics(out: Path, name: str) -> dict[str, float]:
    return json.loads((out / name / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp_dpo", "fsdp_dpo"])
def test_two_processes_train_the_adapter_of_one(runs: Path, run: str) -> None:
    single = adapter(runs, "single_dpo")
    assert all(float(v.abs().max()) > 0 for k, v in single.items() if "lora_B" in k)  # trained from B = 0
    assert_same_adapter(adapter(runs, run), single, atol=2e-4)


@pytest.mark.slow
def test_under_fsdp_every_rank_caches_every_pairs_reference(runs: Path) -> None:
    assert json.loads((runs / "fsdp_dpo" / "cache.json").read_text()) == {"train": 8, "val": 4}
    assert json.loads((runs / "ddp_dpo" / "cache.json").read_text()) == {}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp_dpo", "fsdp_dpo"])
def test_the_reward_metrics_are_reduced_over_the_ranks(runs: Path, run: str) -> None:
    single, distributed = _metrics(runs, "single_dpo"), _metrics(runs, run)
    expected = {
        "train/loss",
        "train/rewards/margin",
        "train/rewards/accuracy",
        "val/loss",
        "val/rewards/margin",
    }
    assert expected <= single.keys() == distributed.keys()
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=2e-4), key
