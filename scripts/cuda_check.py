"""The prepared GPU check of issue #6 (bf16, 16-mixed, quantized bases and FSDP on CUDA); not a test.

On a machine with a GPU (see scripts/cuda_check.sh for the one call that carries the missing wheels):

    python scripts/cuda_check.py --out $OUT            # every check below, ~4-7 minutes on one GPU
    python scripts/cuda_check.py --device cpu --quick  # the same code path on the CPU (dry run)

Checks, each a few optimizer steps of ``litpeft`` through Lightning on ``tiny:llama`` with the bundled
demo data, after one validation pass (the step that broke bitsandbytes' CPU 4-bit backward):

1. LoRA under ``bf16-mixed``, ``16-mixed`` (fp16 autocast + gradient scaler; GPU only) and ``bf16-true``,
   and with 2 accumulated micro-batches per step under ``16-mixed`` (``bf16-mixed`` on the CPU): the token
   weighting's gradient rescale runs after the scaler's unscale;
2. every registered method on an ``nf4`` base under ``bf16-true``, and LoRA on ``int8``;
3. ``PeftFSDPStrategy`` (FSDP2 over the devices, NCCL) with ``nf4``, gradient checkpointing, ``bf16-true``;
4. peak memory and step time of LoRA on the ~1.1B Llama in fp32, bf16, nf4 and int8, then on the
   Llama-3.2-3B shape in nf4 (QLoRA) and bf16-mixed (``scripts/benchmark_memory.py``'s measurement,
   ``torch.cuda.max_memory_allocated``; the 3B random checkpoint is written once, ~6.4 GB, 1-2 minutes).

Each check passes when the loss is finite, every trainable tensor has changed and the adapter is written.
One JSON line per check goes to ``<out>/cuda_check.jsonl``; the exit status is the number of failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _local(t: Any) -> Any:
    """A tensor's local values (an FSDP2 DTensor's shard), detached, on the CPU."""
    t = t.detach()
    return (t.to_local() if hasattr(t, "to_local") else t).cpu().clone()


def _snapshot_callback() -> Any:
    import lightning as L

    class Snapshot(L.Callback):
        """The trainable tensors as training starts (they exist only after configure_model)."""

        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.before = {n: _local(p) for n, p in module.named_parameters() if p.requires_grad}

    return Snapshot()


def fit(
    device: str,
    method: str,
    precision: str,
    quantize: str | None = None,
    fsdp: bool = False,
    accumulate: int = 1,
) -> dict:
    """A few steps of ``method`` on tiny:llama; what changed and the last loss."""
    import lightning as L
    import torch

    from litpeft.data import InstructionDataModule
    from litpeft.methods import METHODS
    from litpeft.module import PeftLM

    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        module = PeftLM(
            "tiny:llama",
            method=METHODS[method](),
            quantize=quantize,
            gradient_checkpointing=fsdp,
            adapter_dir=f"{tmp}/adapter",
        )
        module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
        demo = REPO / "litpeft" / "data" / "demo"
        data = InstructionDataModule(
            train_file=str(demo / "train.jsonl"), val_file=str(demo / "val.jsonl"), batch_size=4
        )
        strategy: Any = "auto"
        if fsdp:
            from litpeft.distributed import PeftFSDPStrategy

            strategy = PeftFSDPStrategy()
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            strategy=strategy,
            precision=precision,
            max_steps=3,
            accumulate_grad_batches=accumulate,
            limit_val_batches=1,
            num_sanity_val_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        snapshot = _snapshot_callback()
        trainer.callbacks.append(snapshot)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=data)
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        unchanged = [n for n, p in trainable.items() if torch.equal(_local(p), snapshot.before[n])]
        loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
        return {
            "seconds": round(time.perf_counter() - t0, 1),
            "loss": round(loss, 4),
            "trainable_dtypes": sorted({str(p.dtype) for p in trainable.values()}),
            "moved": not unchanged,
            "unchanged": unchanged[:5],
            "finite": bool(torch.isfinite(torch.tensor(loss))),
            "adapter_written": (Path(tmp) / "adapter" / "adapter.safetensors").exists(),
        }


def plan(device: str, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    from litpeft.methods import METHODS

    cuda = device == "cuda"
    checks = [(f"lora {p}", {"method": "lora", "precision": p}) for p in ["bf16-mixed", "bf16-true"]]
    if cuda:
        checks.append(("lora 16-mixed", {"method": "lora", "precision": "16-mixed"}))
    # token weighting over accumulated micro-batches (after GradScaler's unscale under 16-mixed)
    mixed = "16-mixed" if cuda else "bf16-mixed"
    checks.append((f"lora {mixed} accumulate 2", {"method": "lora", "precision": mixed, "accumulate": 2}))
    methods = ["lora", "prefix_tuning"] if quick else sorted(METHODS)
    checks += [
        (f"{m} nf4 bf16-true", {"method": m, "precision": "bf16-true", "quantize": "nf4"}) for m in methods
    ]
    checks.append(("lora int8 bf16-true", {"method": "lora", "precision": "bf16-true", "quantize": "int8"}))
    checks.append(
        (
            "lora nf4 fsdp ckpt bf16-true",
            {"method": "lora", "precision": "bf16-true", "quantize": "nf4", "fsdp": True},
        )
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="two methods and no 1.1B memory table")
    parser.add_argument("--out", type=Path, default=Path("."), help="where cuda_check.jsonl goes")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "cuda_check.jsonl").open("w")
    env = {
        "check": "environment",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    for name in ("transformers", "lightning", "bitsandbytes", "peft"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    print(json.dumps(env), flush=True)
    log.write(json.dumps(env) + "\n")
    failures = 0
    for name, kwargs in plan(args.device, args.quick):
        try:
            result = {"check": name, **fit(args.device, **kwargs)}
            result["ok"] = result["moved"] and result["finite"] and result["adapter_written"]
        except Exception as e:  # report and go on: one run should show every check
            result = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        failures += not result["ok"]
        print(json.dumps(result), flush=True)
        log.write(json.dumps(result) + "\n")
    if not args.quick:
        sys.path.insert(0, str(REPO / "scripts"))
        from benchmark_memory import run_one

        # the 1.1B table, then a Llama-3.2-3B-shaped QLoRA step and bf16-mixed LoRA step (issue #15)
        runs = [("llama-1b", mode) for mode in ["fp32", "bf16", "nf4", "int8"]]
        runs += [("llama-3.2-3b", "nf4"), ("llama-3.2-3b", "bf16-mixed")]
        for shape, mode in runs:
            try:
                result = {
                    "check": f"memory {shape} {mode}",
                    **run_one(shape, mode, 5 if shape == "llama-1b" else 3, 4, 256, args.device),
                }
                result["ok"] = True
            except Exception as e:
                result = {
                    "check": f"memory {shape} {mode}",
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}",
                }
                failures += 1
            print(json.dumps(result), flush=True)
            log.write(json.dumps(result) + "\n")
            if args.device == "cuda":
                torch.cuda.empty_cache()
    log.close()
    print(f"{failures} of the checks failed", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
