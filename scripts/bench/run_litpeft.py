"""litpeft's side: PeftLM trained by Lightning's Trainer, each training batch timed by a callback.

The speed changes a configuration ablates are already off (:func:`litpeft.speedups.switch_off`, in the
worker) when this runs: litpeft reads :data:`litpeft.speedups.SPEEDUPS` on its own code paths.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from bench.config import BATCH_SIZE, METHODS, SEED
from bench.data import demo_files, model_spec
from bench.measure import StepTimer, rss_mb


def run_litpeft(cfg: dict[str, Any], timer: StepTimer) -> dict[str, Any]:
    import lightning as L

    from litpeft.data import InstructionDataModule
    from litpeft.methods import method_from_config
    from litpeft.module import PeftLM

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            timer.start(batch)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            timer.stop()

    L.seed_everything(SEED, verbose=False)
    kwargs: dict[str, Any] = {}
    if cfg.get("quantize"):
        kwargs["quantize"] = cfg["quantize"]
    with tempfile.TemporaryDirectory() as tmp:
        module = PeftLM(
            model=model_spec(cfg["model"]),
            method=method_from_config(METHODS[cfg["method"]]["litpeft"]),
            adapter_dir=tmp,
            **kwargs,
        )
        if cfg.get("compile"):
            _compile_litpeft(module, cfg)
        train, val = demo_files(cfg["data"])
        dm = InstructionDataModule(train_file=train, val_file=val, batch_size=BATCH_SIZE, seed=SEED)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=cfg["precision"],
            max_steps=cfg["warmup"] + cfg["steps"],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[Timing()],
        )
        timer.rss_before = rss_mb()
        trainer.fit(module, datamodule=dm)
        model = module.model
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"model": model, "n_trainable": n_lora, "head": "loss"}


def _compile_litpeft(module: Any, cfg: dict[str, Any]) -> None:
    """Compile the decoder (not the head: its input shape changes every step) after configure_model."""
    import torch

    original = module.configure_model

    def configure_model() -> None:
        original()
        t0 = time.perf_counter()
        module.model.model.compile(dynamic=True)
        cfg["compile_setup_s"] = time.perf_counter() - t0

    module.configure_model = configure_model
    torch._dynamo.config.cache_size_limit = 64
