#!/usr/bin/env python3
"""The preference demo: DPO teaches SmolLM2-135M-Instruct to write dates in ISO form when asked for "digits".

The bundled pairs (``scripts/make_preference_data.py``) hold the same date twice, ISO 8601 preferred over
another numeric form. The script

1. generates greedy answers of the base model to the 60 held-out prompts and counts the share in ISO form
   (``YYYY-MM-DD``) and the share that is the right date in ISO form;
2. runs ``litpeft fit --config configs/orpo.yaml`` on the bundled pairs (LoRA r=16, ORPO lambda 0.1, CSV log;
   ``--config configs/dpo.yaml`` for DPO);
3. generates again with the trained adapter and counts the same shares;
4. prints a table and writes ``<out>/summary.json`` (the reward accuracy and margin on the held-out pairs
   at each validation, the format shares before and after, the wall time).

    python scripts/preference_demo.py                 # ORPO: 119 s on an idle 2-core CPU (docs/preference.md)
    python scripts/preference_demo.py --config configs/dpo.yaml       # DPO
    python scripts/preference_demo.py --max-steps 20  # a quicker look
    python scripts/preference_demo.py --optimizer.init_args.lr 5e-5   # any other flag goes to litpeft fit
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

from litpeft.cli import main as litpeft
from litpeft.inference import generate, load_for_inference
from litpeft.preference.data import DEMO_VAL

REPO = Path(__file__).resolve().parents[1]
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def format_shares(adapter: str | None, rows: list[dict[str, str]]) -> tuple[float, float, list[str]]:
    """Share of greedy answers in ISO form, share that are the right ISO date, and the answers."""
    loaded = load_for_inference(adapter, None if adapter else "smollm2-135m-instruct")
    prompts = [
        loaded.style.generation_prompt([{"role": "user", "content": r["prompt"]}], loaded.tokenizer)
        for r in rows
    ]
    answers = [
        a.strip() for a in generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=16, batch_size=30)
    ]
    iso = sum(bool(ISO.match(a)) for a in answers) / len(rows)
    right = sum(a == r["chosen"] for a, r in zip(answers, rows, strict=True)) / len(rows)
    return iso, right, answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/preference_demo", help="run directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "orpo.yaml"), help="the preference config")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps (4 pairs each)")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    rows = [json.loads(line) for line in DEMO_VAL.read_text().splitlines()]
    start = time.monotonic()

    iso_before, right_before, answers_before = format_shares(None, rows)
    print(f"base model: {iso_before:.0%} of answers in ISO form ({right_before:.0%} the right date)")
    litpeft(
        [
            "fit", "--config", args.config,
            "--data.init_args.train_file", "demo",
            "--trainer.max_steps", str(args.max_steps),
            "--trainer.val_check_interval", str(max(1, args.max_steps // 4)),
            "--trainer.default_root_dir", str(out),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(out),
            "--trainer.callbacks", "[]",
            "--model.init_args.adapter_dir", str(out / "adapter"),
            "--data.init_args.eval_batch_size", "30",
            *overrides,
        ]
    )  # fmt: skip
    iso_after, right_after, answers_after = format_shares(str(out / "adapter"), rows)

    with sorted(out.glob("**/metrics.csv"))[-1].open() as f:
        logged = list(csv.DictReader(f))
    val = [
        {
            "step": int(r["step"]) + 1,
            "accuracy": float(r["val/rewards/accuracy"]),
            "margin": float(r["val/rewards/margin"]),
        }
        for r in logged
        if r.get("val/rewards/accuracy")
    ]
    summary = {
        "max_steps": args.max_steps,
        "config": args.config,
        "overrides": overrides,
        "seconds": round(time.monotonic() - start),
        "iso_share": {"before": iso_before, "after": iso_after},
        "right_iso_date": {"before": right_before, "after": right_after},
        "val_rewards": val,
        "examples": [
            {"prompt": r["prompt"], "before": b, "after": a}
            for r, b, a in zip(rows[:5], answers_before, answers_after, strict=False)
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nheld-out pairs: reward accuracy and margin (DPO's implicit reward, beta * log pi/ref)")
    for v in val:
        print(f"  step {v['step']:>4}: accuracy {v['accuracy']:.2f}, margin {v['margin']:+.3f}")
    print(
        f"ISO answers: {iso_before:.0%} -> {iso_after:.0%}; right ISO date: {right_before:.0%} -> {right_after:.0%}"
    )
    print(f"{summary['seconds']} s; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
