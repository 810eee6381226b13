"""``scripts/benchmark.py --profile``: torch.profiler over litpeft LoRA training steps."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from bench.config import LR, METHODS, SEED, SMOLLM2
from bench.data import batches


def profile(precision: str, steps: int, out: Path, threads: int = 0) -> None:
    """torch.profiler over litpeft LoRA training steps on SmolLM2-135M (after one warm-up step)."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from litpeft.methods import method_from_config
    from litpeft.module import PeftLM

    torch.manual_seed(SEED)
    torch.set_num_threads(threads or torch.get_num_threads())
    module = PeftLM(model=SMOLLM2, method=method_from_config(METHODS["lora"]["litpeft"]))
    module.configure_model()
    if precision == "bf16-true":
        module.to(torch.bfloat16)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=LR, weight_decay=0.0)
    data = batches(SMOLLM2, "demo", steps + 1)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )

    def step(batch: dict[str, Any]) -> None:
        with record_function("forward+loss"), autocast:
            loss = module.loss_and_accuracy(module.without_padding_mask(batch))[0]
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(data[0])
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in data[1:]:
            step(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{precision}.txt").write_text(table)
    print(table)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))
