"""Run by tests/preference/test_preference_distributed.py as ``python .../preference_distributed_worker.py
OUT`` (not a test module); Lightning starts the second process by running this script again.

With tests/distributed_worker.py's ``fit`` (seed 0, LoRA r=4 on ``tiny:llama``, AdamW lr 1e-2) it trains DPO on
the pairs in OUT/pairs on 2 CPU processes (gloo), 2 pairs per rank, 2 steps, validation on 2 pairs per rank:

- ``ddp_dpo``: under DDP, the reference pass each step;
- ``fsdp_dpo``: under PeftFSDPStrategy with ``precompute_reference``.

Each writes its adapter to OUT/<name>/adapter, and rank 0 the trainer's last logged metrics to
OUT/<name>/metrics.json and the number of pairs with cached reference log-probs per split to cache.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: distributed_worker
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: litpeft

from distributed_worker import fit  # noqa: E402

from litpeft.distributed import PeftFSDPStrategy  # noqa: E402
from litpeft.preference import PreferenceDataModule, PreferenceLM  # noqa: E402

BETA = 0.5


def fit_dpo(out: Path, name: str, strategy: object, devices: int, batch_size: int, **kwargs: object) -> None:
    """One DPO fit; the single-process reference of the test runs it too."""
    trainer = fit(
        out, name, strategy, devices, batch_size, 2, data="pairs", module_class=PreferenceLM,
        data_class=PreferenceDataModule, loss="dpo", beta=BETA, **kwargs,
    )  # fmt: skip
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / name / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        cache = trainer.lightning_module.reference_cache.logps  # split -> the pairs' cached values
        sizes = {split: int(v.isfinite().all(-1).sum()) for split, v in cache.items()}
        (out / name / "cache.json").write_text(json.dumps(sizes))


def main(out: Path) -> None:
    fit_dpo(out, "ddp_dpo", "ddp", 2, 2)
    fit_dpo(out, "fsdp_dpo", PeftFSDPStrategy(), 2, 2, precompute_reference=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
