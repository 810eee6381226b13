"""transformers + peft in the plain PyTorch loop a user writes: the model's own full-logits loss."""

from __future__ import annotations

import contextlib
from typing import Any

from bench.config import LR, METHODS, SEED
from bench.data import batches, model_spec
from bench.measure import StepTimer, rss_mb


def peft_model(
    cfg: dict[str, Any], config: tuple[str, dict[str, Any]] | None = None, seed: int = SEED
) -> Any:
    """The base model of ``cfg["model"]`` with peft's counterpart of ``cfg["method"]`` (or ``config``:
    a peft config class name and its arguments), in training mode."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from litpeft.models import resolve_spec

    torch.manual_seed(seed)
    if cfg["model"].startswith("tiny:"):  # for trying the script out quickly
        from litpeft.models import load_model

        model = load_model(cfg["model"])
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_spec(model_spec(cfg["model"])), dtype=torch.float32, local_files_only=True
        )
    kind, kwargs = config or METHODS[cfg["method"]]["peft"]
    model = peft.get_peft_model(model, getattr(peft, kind)(task_type="CAUSAL_LM", **kwargs))
    if cfg["precision"] == "bf16-true":
        model = model.to(torch.bfloat16)
    model.train()
    return model


def run_peft(cfg: dict[str, Any], timer: StepTimer) -> dict[str, Any]:
    """transformers + peft in the plain loop a user writes: full-logits loss from the model itself."""
    import torch

    data = batches(model_spec(cfg["model"]), cfg["data"], cfg["warmup"] + cfg["steps"])
    timer.rss_before = rss_mb()
    model = peft_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if cfg["precision"] == "bf16-mixed"
        else contextlib.nullcontext()
    )
    for batch in data:
        timer.start(batch)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.stop()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model, "n_trainable": n, "head": "all"}
