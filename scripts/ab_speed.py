"""Interleaved A/B of litpeft's speed changes, one process (not a test).

    python scripts/ab_speed.py --threads 2                  # LoRA r16 on SmolLM2-135M, demo batches
    python scripts/ab_speed.py --method prompt_tuning --changes frozen_bf16
    python scripts/ab_speed.py --method lora_dropout --changes fast_dropout
    python scripts/ab_speed.py --peft --changes           # litpeft against transformers + peft only
    python scripts/ab_speed.py --vs-32-true --changes --precision bf16-true   # the precision's speedup
    python scripts/ab_speed.py --model tiny:llama --changes padding_mask --steps 1 --warmup 0   # smoke run

``scripts/benchmark.py`` runs each configuration in its own process, so a few percent are lost in the
spread between processes (20% and more on a shared machine). Here each change is measured against
litpeft with all changes in the same process (each change a switch of ``litpeft.speedups.SPEEDUPS``,
off around the other model's build and steps only): two models built from the same seed, the same batches,
the steps alternating A B B A, so that whatever else the machine does slows both alike. The figure per
change is the median over steps of (step time without it) / (step time with it): above 1 the change
helps. The step is PeftLM's loss, backward and AdamW, without Lightning's loop (the same for both).

``--peft`` measures litpeft against transformers + peft the same way (peft's plain loop of
scripts/benchmark.py: the model's own full-logits loss), the figure being peft's step time over
litpeft's. Lightning's loop is left out on litpeft's side here; scripts/benchmark.py includes it.
``--vs-32-true`` measures litpeft at ``--precision`` against litpeft at 32-true (32-true's step time over
the precision's: the precision's speedup).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench.config import METHODS, SPEED_CHANGES, speedups_off
from bench.data import batches, model_spec


def build(model: str, method: str, precision: str, without: str | None) -> tuple[Any, torch.optim.Optimizer]:
    """litpeft's ``method`` with every speed change, or without the change ``without``.

    Build-time switches (``cpu_sdpa``, ``frozen_bf16``) are read by ``configure_model``; the others at
    every step (:func:`litpeft_step` turns ``without`` off around each of its steps as well).
    """
    from lightning.pytorch import Trainer

    from litpeft.methods import method_from_config
    from litpeft.module import PeftLM

    torch.manual_seed(0)
    module = PeftLM(model_spec(model), method=method_from_config(METHODS[method]["litpeft"]))
    module.trainer = Trainer(precision=precision, logger=False, enable_progress_bar=False, accelerator="cpu")
    with speedups_off([without] if without else []):
        module.configure_model()
    return module, torch.optim.AdamW(module.trainable_parameters(), lr=2e-4)


Step = Callable[[dict[str, torch.Tensor]], float]


def litpeft_step(model: str, method: str, precision: str, without: str | None) -> Step:
    """One litpeft training step (loss at the loss positions, backward, AdamW), timed."""
    module, optimizer = build(model, method, precision, without)
    off = [without] if without else []

    def step(batch: dict[str, torch.Tensor]) -> float:
        # the switches are process-wide: ``without`` is off during this model's steps only
        with speedups_off(off):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss, _, _ = module.loss_and_accuracy(module.without_padding_mask(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

    return step


def peft_step(model_name: str, method: str, precision: str) -> Step:
    """One step of transformers + peft in the plain loop of scripts/benchmark.py, timed."""
    from bench.run_peft import peft_model

    model = peft_model({"model": model_name, "method": method, "precision": precision})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def compare(a: Step, b: Step, data: list[dict[str, torch.Tensor]], warmup: int) -> dict[str, Any]:
    """Steps of ``a`` and ``b`` alternating A B, B A over ``data``; the median of (b time) / (a time)."""
    ratios, times = [], {"a": [], "b": []}
    for i, batch in enumerate(data):
        order = [("a", a), ("b", b)] if i % 2 == 0 else [("b", b), ("a", a)]
        t = {name: fn(batch) for name, fn in order}
        if i >= warmup:
            ratios.append(t["b"] / t["a"])
            for name in t:
                times[name].append(t[name])
    return {
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "step_s_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "steps": len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="lora", choices=list(METHODS), help="as in scripts/benchmark.py")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true", "bf16-true"])
    parser.add_argument("--changes", nargs="*", default=SPEED_CHANGES, choices=SPEED_CHANGES)
    parser.add_argument("--peft", action="store_true", help="also litpeft against transformers + peft")
    parser.add_argument(
        "--vs-32-true", action="store_true", help="also litpeft at --precision against litpeft at 32-true"
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="base model (tiny:llama to try the script out)"
    )
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = batches(model_spec(args.model), "demo", args.warmup + args.steps)
    print(
        f"{args.method}, {args.precision}, torch threads {torch.get_num_threads()}, "
        f"{args.steps} steps after {args.warmup}"
    )
    against = (["peft"] if args.peft else []) + (["32-true"] if args.vs_32_true else [])
    has_dropout = METHODS[args.method]["litpeft"]["init_args"].get("dropout", 0) > 0
    against += [
        c
        for c in args.changes
        if not (c == "lora_forward" and not args.method.startswith("lora"))
        and not (c == "fast_dropout" and not has_dropout)
    ]
    for other in against:
        a = litpeft_step(args.model, args.method, args.precision, None)
        if other == "peft":
            b = peft_step(args.model, args.method, args.precision)
        elif other == "32-true":
            b = litpeft_step(args.model, args.method, "32-true", None)
        else:
            b = litpeft_step(args.model, args.method, args.precision, other)
        r = compare(a, b, data, args.warmup)
        label = {"peft": "litpeft vs peft", "32-true": f"{args.precision} vs 32-true"}.get(
            other, f"{other} (litpeft without it)"
        )
        print(
            f"{label:32s} {r['ratio_median']:.3f}x (range {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}), "
            f"step {r['step_s_median']['a']:.2f} s litpeft, {r['step_s_median']['b']:.2f} s other",
            flush=True,
        )
        del a, b


if __name__ == "__main__":
    main()
