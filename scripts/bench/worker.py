"""One configuration, in its own process (started by the driver): ablation switches, the run, the figures."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.config import BATCH_SIZE, METHODS, switch_off
from bench.measure import StepTimer, model_flops, peak_rss_mb

#: ``cfg["runner"]``: the module and function of each comparison (imported only when it runs).
RUNNERS = {
    "litpeft": ("bench.run_litpeft", "run_litpeft"),
    "peft": ("bench.run_peft", "run_peft"),
    "trainer": ("bench.run_trainer", "run_trainer"),
}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``cfg`` and return it with its figures (the driver prints the table rows from these)."""
    import importlib

    import torch

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    # litpeft without some of its speed changes: the switches its own code reads, off for this process
    switch_off(cfg.get("ablate", []))
    timer = StepTimer()
    t0 = time.perf_counter()
    module, name = RUNNERS[cfg["runner"]]
    out = getattr(importlib.import_module(module), name)(cfg, timer)
    total_s = time.perf_counter() - t0
    w = cfg["warmup"]
    times, tokens, loss_tokens = timer.times[w:], timer.tokens[w:], timer.loss_tokens[w:]
    if len(times) != cfg["steps"]:
        raise RuntimeError(f"measured {len(times)} steps, expected {cfg['steps']}")
    virtual = METHODS[cfg["method"]].get("virtual_tokens", 0)
    flops = 0.0
    for tok, ltok, pad in zip(tokens, loss_tokens, timer.padded[w:], strict=True):
        t = tok + virtual * BATCH_SIZE
        head = ltok if out["head"] == "loss" else t
        flops += model_flops(
            out["model"], t, pad + virtual, head, METHODS[cfg["method"]].get("virtual_keys", 0)
        )
    secs = sum(times)
    return {
        **{k: v for k, v in cfg.items() if k != "threads"},
        "step_s_median": statistics.median(times),
        "step_s": times,
        "warmup_step_s": timer.times[:w],
        "cpu_s_median": statistics.median(timer.cpu[w:]),
        "tokens_per_s": sum(tokens) / secs,
        "loss_tokens_per_s": sum(loss_tokens) / secs,
        "tokens_per_step": statistics.mean(tokens),
        "loss_tokens_per_step": statistics.mean(loss_tokens),
        "token_counts": tokens,
        "model_flops_per_s": flops / secs,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": timer.rss_before,
        "n_trainable": out["n_trainable"],
        "wall_s": total_s,
        "threads": torch.get_num_threads(),
    }
