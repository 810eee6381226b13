"""transformers' Trainer with peft: the same model, batches (same order) and optimizer settings."""

from __future__ import annotations

import tempfile
from typing import Any

from bench.config import BATCH_SIZE, LR, SEED
from bench.data import batches, model_spec
from bench.measure import StepTimer, rss_mb
from bench.run_peft import peft_model


def run_trainer(cfg: dict[str, Any], timer: StepTimer) -> dict[str, Any]:
    """transformers' Trainer with the same model, batches (same order) and optimizer settings."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = batches(model_spec(cfg["model"]), cfg["data"], cfg["warmup"] + cfg["steps"])
    rows = [
        {k: v[i][: int(b["attention_mask"][i].sum())] for k, v in b.items()}
        for b in data
        for i in range(b["input_ids"].shape[0])
    ]
    order: list[dict[str, Any]] = []

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = data[len(order)]  # the very batch litpeft sees (same padding)
        order.append(batch)
        return batch

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:
            timer.start(order[state.global_step])

        def on_step_end(self, args, state, control, **kwargs) -> None:
            timer.stop()

    class FixedOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    timer.rss_before = rss_mb()
    model = peft_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=cfg["warmup"] + cfg["steps"],
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LR,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,
            optim="adamw_torch",
            bf16=cfg["precision"] == "bf16-mixed",
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=SEED,
        )
        trainer = FixedOrder(
            model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Timing()]
        )
        trainer.train()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model, "n_trainable": n, "head": "all"}
