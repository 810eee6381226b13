"""Run by tests/test_distributed.py as ``python tests/distributed_worker.py OUT`` (not a test module).

Lightning starts the second process by running this script again. In one launch of 2 CPU processes
(gloo) it trains, each time from the same seed, on the equal-length data the test wrote to OUT/data:

- ``ddp``: LoRA under DDP, 2 steps of 2 samples per rank;
- ``ddp_uneven``: the same on OUT/uneven, whose samples have different numbers of loss tokens;
- ``ddp_accumulated``: the same with 1 sample per rank and 2 micro-batches per optimizer step;
- ``fsdp_accumulated``: that under PeftFSDPStrategy;
- ``fsdp``: LoRA on an nf4 base under PeftFSDPStrategy with gradient checkpointing, 4 steps of 2 samples
  per rank, a checkpoint every 2 steps;
- ``fsdp_resumed``: the same run resumed from its step-2 checkpoint;
- ``fsdp_int8``: LoRA on an int8 base under PeftFSDPStrategy, 2 steps, adapter to the default place;
- ``fsdp_<method>``: every other method (``METHODS``) under PeftFSDPStrategy, 2 steps;
- ``fsdp_adalora``: AdaLoRA under PeftFSDPStrategy, which it refuses: each rank writes the error it got
  to OUT/fsdp_adalora/error<rank>.txt.

Each writes its adapter to OUT/<name>/adapter (the log dir without a logger is OUT/<name>).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from litpeft.data import InstructionDataModule  # noqa: E402
from litpeft.distributed import PeftFSDPStrategy  # noqa: E402
from litpeft.errors import LitPeftError  # noqa: E402
from litpeft.methods import (  # noqa: E402
    IA3,
    OFT,
    AdaLoRA,
    BitFit,
    HoulsbyAdapter,
    LlamaAdapter,
    LlamaAdapterV2,
    LNTuning,
    LoHa,
    LoKr,
    LoRA,
    PeftMethod,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    VeRA,
)
from litpeft.module import PeftLM  # noqa: E402

LR = 1e-2

#: Every method besides LoRA, trained under FSDP in the same launch and compared with one process.
METHODS: dict[str, Callable[[], PeftMethod]] = {
    "lora": lambda: LoRA(r=4, alpha=8),
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=3),
    "p_tuning": lambda: PTuning(num_virtual_tokens=3, encoder="mlp"),
    "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=3),
    "p_tuning_v2": lambda: PTuningV2(num_virtual_tokens=3),
    "houlsby": lambda: HoulsbyAdapter(bottleneck_size=8, init="zero_up"),
    "llama_adapter": lambda: LlamaAdapter(adapter_len=3, adapter_layers=2),
    "llama_adapter_v2": lambda: LlamaAdapterV2(adapter_len=3, adapter_layers=2),
    "ia3": IA3,
    "ln_tuning": LNTuning,
    "bitfit": lambda: BitFit(add_missing_biases=True),
    "vera": lambda: VeRA(r=8),
    "loha": lambda: LoHa(r=2, alpha=4),
    "lokr": lambda: LoKr(r=2, alpha=4),
    "oft": lambda: OFT(oft_block_size=8),
    # only rank 0 decomposes the base weight; the other ranks receive the rewritten base and A, B
    "lora_pissa": lambda: LoRA(r=4, alpha=8, init="pissa"),
    "lora_olora": lambda: LoRA(r=4, alpha=8, init="olora"),
    "loraplus": lambda: LoRA(r=4, alpha=8),
}
#: Methods that refuse FSDP: not in ``METHODS``, run only to see the refusal.
REFUSED = {"adalora": lambda: AdaLoRA(init_r=4, target_r=2)}
#: PeftLM arguments of a run of ``METHODS`` besides the method itself.
MODULE_KWARGS: dict[str, dict[str, Any]] = {"loraplus": {"loraplus_lr_ratio": 4.0}}


def fit(
    out: Path,
    name: str,
    strategy: object,
    devices: int,
    batch_size: int,
    max_steps: int,
    quantize: str | None = None,
    gradient_checkpointing: bool = False,
    ckpt_path: str | None = None,
    every_n_steps: int | None = None,
    adapter_dir: bool = True,
    method: str = "lora",
    data: str = "data",
    accumulate: int = 1,
    num_nodes: int = 1,
    module_class: Callable[..., PeftLM] = PeftLM,
    data_class: Callable[..., L.LightningDataModule] = InstructionDataModule,
    **module_kwargs: Any,
) -> L.Trainer:
    """One fit; shared with the single-process reference runs of the test, tests/multinode_worker.py and
    tests/preference/preference_distributed_worker.py (``module_class``, ``data_class``, ``module_kwargs``)."""
    L.seed_everything(0)
    module = module_class(
        "tiny:llama",
        method={**METHODS, **REFUSED}[method](),
        quantize=quantize,
        gradient_checkpointing=gradient_checkpointing,
        # None: the default <log_dir>/adapter, which asks every rank for trainer.log_dir (a broadcast)
        adapter_dir=str(out / name / "adapter") if adapter_dir else None,
        **{**MODULE_KWARGS.get(method, {}), **module_kwargs},
    )
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR, "weight_decay": 0.0}}
    data = data_class(
        train_file=str(out / data / "train.jsonl"),
        val_file=str(out / data / "val.jsonl"),
        batch_size=batch_size,
    )
    callbacks = []
    if every_n_steps:
        callbacks.append(
            ModelCheckpoint(dirpath=out / name / "ckpt", every_n_train_steps=every_n_steps, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every_n_steps),
        callbacks=callbacks,
        num_sanity_val_steps=1,  # an eval-mode no-grad pass before training (the bitsandbytes CPU trap)
        limit_val_batches=1,
        val_check_interval=2,
        default_root_dir=str(out / name),
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def main(out: Path) -> None:
    fit(out, "ddp", "ddp", 2, 2, 2)
    fit(out, "ddp_uneven", "ddp", 2, 2, 2, data="uneven")
    fit(out, "ddp_accumulated", "ddp", 2, 1, 2, data="uneven", accumulate=2)
    fit(out, "fsdp_accumulated", PeftFSDPStrategy(), 2, 1, 2, data="uneven", accumulate=2)
    fit(out, "fsdp", PeftFSDPStrategy(), 2, 2, 4, "nf4", True, every_n_steps=2)
    ckpt = str(out / "fsdp" / "ckpt" / "epoch=0-step=2.ckpt")
    fit(out, "fsdp_resumed", PeftFSDPStrategy(), 2, 2, 4, "nf4", True, ckpt_path=ckpt)
    fit(out, "fsdp_int8", PeftFSDPStrategy(), 2, 2, 2, "int8", adapter_dir=False)
    for name in METHODS:
        if name != "lora":
            fit(out, f"fsdp_{name}", PeftFSDPStrategy(), 2, 2, 2, method=name)
    try:  # last: a failed fit leaves the process group as it was, but nothing else needs it
        fit(out, "fsdp_adalora", PeftFSDPStrategy(), 2, 2, 2, method="adalora")
    except LitPeftError as e:
        (out / "fsdp_adalora").mkdir(exist_ok=True)
        (out / "fsdp_adalora" / f"error{dist.get_rank()}.txt").write_text(str(e))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
