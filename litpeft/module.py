"""``PeftLM``: a Hugging Face causal LM with one PEFT method, trained by Lightning."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import instantiate_class
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from litpeft import heap, precision
from litpeft.adapter_dir import save_adapter
from litpeft.distributed import data_parallel_mesh, full_adapter, shard_model
from litpeft.errors import check
from litpeft.loading import storage_dtypes
from litpeft.loss import answer_logits, token_loss
from litpeft.methods import LoRA, PeftMethod
from litpeft.methods.attention import CPU_SDPA
from litpeft.methods.lora import loraplus_param_groups
from litpeft.models import checkpoint_dtype, describe, load_model, load_tokenizer, stored_quantization
from litpeft.quantize import QuantMode, check_mode, check_stored_mode, quantize_model
from litpeft.resume import run_dir
from litpeft.rng_state import TrainingRNG
from litpeft.schedulers import build_lr_scheduler
from litpeft.slurm import was_preempted
from litpeft.speedups import SPEEDUPS

log = logging.getLogger(__name__)

#: AdamW over the trainable tensors; the CLI's default ``optimizer`` too.
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-4, "weight_decay": 0.0}}


class PeftLM(L.LightningModule):
    """A causal LM (frozen) plus one PEFT method (trainable).

    Args:
        model: model spec (see :mod:`litpeft.models`): ``smollm2-135m-instruct``, a directory, a ``.gguf``
            file, a hub id ``org/name`` or ``org/name@revision`` (downloaded on first use), or ``tiny:<arch>``.
        method: the PEFT method, e.g. ``{class_path: LoRA, init_args: {r: 16}}``.
        quantize: load the frozen base quantized (QLoRA and friends): ``nf4``, ``nf4-dq`` (double
            quantization), ``fp4`` or ``int8``; needs ``pip install 'litpeft[quant]'``. See
            :mod:`litpeft.quantize`.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: allow code from the model directory to run (off by default).
        adapter_dir: where ``fit`` writes the final adapter; default ``<log_dir>/adapter``
            (:func:`litpeft.resume.run_dir`).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024, arXiv 2402.12354): train LoRA's ``B`` matrices (and
            DoRA's magnitudes, trained biases) with this many times the optimizer's LR, ``A`` with the LR
            itself (any LoRA variant; see :func:`litpeft.methods.lora.loraplus_param_groups`).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        method: PeftMethod = lazy_instance(LoRA),
        quantize: QuantMode | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        adapter_dir: str | None = None,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__()
        check_mode(quantize)
        check(
            loraplus_lr_ratio is None or (isinstance(method, LoRA) and loraplus_lr_ratio > 0),
            "model.loraplus_lr_ratio",
            loraplus_lr_ratio,
            f"LoRA+ sets the LR of LoRA's B matrices: a positive ratio with a LoRA method, not '{method.name}'"
            if not isinstance(method, LoRA)
            else "a positive ratio (the paper: 2 to 2^4 and more)",
        )
        self.model_spec, self.method, self.quantize = model, method, quantize
        self.gradient_checkpointing, self.trust_remote_code = gradient_checkpointing, trust_remote_code
        self.adapter_dir, self.loraplus_lr_ratio = adapter_dir, loraplus_lr_ratio
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        # a checkpoint stored quantized by bitsandbytes is that quantized base (model.quantize null or equal)
        self.quantize = check_stored_mode(quantize, stored_quantization(model, trust_remote_code))
        self.model: PreTrainedModel | None = None
        self.optimizer_init: dict[str, Any] = DEFAULT_OPTIMIZER
        self.lr_scheduler_init: dict[str, Any] | None = None
        # Checkpoints hold only the trainable tensors; loading them must not demand the frozen base.
        self.strict_loading = False
        self.train_loss, self.val_loss, self.val_acc = MeanMetric(), MeanMetric(), MeanMetric()
        # loss tokens (all ranks) of the first micro-batch of the current optimizer step, and of all so far
        self._step_first_tokens: torch.Tensor | None = None
        self._step_tokens: torch.Tensor | None = None

    # -- model --------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        mesh = data_parallel_mesh(self)  # set only under PeftFSDPStrategy
        self.model = self.build_model() if mesh is None else shard_model(self.build_model, mesh)
        precision.cast_copies_out_of_ddp(self)
        heap.trim()  # what loading freed (checkpoint buffers, the weights a quantized layer came from)
        self.model.train()  # dropout as in ordinary fine-tuning; load_model returns eval mode
        info = describe(self.model)
        log.info(
            "%s with %s: %s trainable of %s parameters (%.3f%%)",
            info["architecture"],
            self.method,
            f"{info['trainable']:,}",
            f"{info['parameters']:,}",
            100 * info["trainable"] / info["parameters"],
        )

    def build_model(self, meta: bool = False) -> PreTrainedModel:
        """The frozen base (in the precision's dtype, quantized if asked) with the method applied.

        Each base tensor is read in the dtype it is kept in (:meth:`storage_dtypes`): under ``bf16-mixed``
        no fp32 copy of a frozen linear weight is made.

        The method's tensors are created in fp32 whatever the precision: under ``bf16-true`` only the
        frozen base is bf16, the adapter keeps fp32 weights (and AdamW fp32 states) and is cast at use.
        """
        with precision.default_dtype(torch.float32):
            model = load_model(
                self.model_spec,
                dtype=self.base_dtype(),
                trust_remote_code=self.trust_remote_code,
                tokenizer=self.tokenizer,
                meta=meta,
                dtypes=self.storage_dtypes(),  # on the meta device too: the ranks' dtypes match
            )
            if self.quantize:
                quantize_model(model, self.quantize)
                heap.trim()
            self.method.apply(model)
            # a method may have set its own attention
            if model.config._attn_implementation == "sdpa" and SPEEDUPS.cpu_sdpa:
                model.set_attn_implementation(CPU_SDPA)
            if self.autocast_dtype() is not None:
                precision.store_frozen_base(model, self.autocast_dtype())
        if self.gradient_checkpointing:
            # transformers >= 5.x names it activation_checkpointing_enable; both wrap each decoder layer's forward
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def storage_dtypes(self) -> dict[str, torch.dtype] | None:
        """The base tensors to read in 16 bits when the base is loaded in fp32 (see :mod:`litpeft.loading`)."""
        if self.model_spec.startswith("tiny:") or self.base_dtype() != torch.float32:
            return None
        if not (self.autocast_dtype() or self.quantize):
            return None
        spec, remote = self.model_spec, self.trust_remote_code
        return storage_dtypes(
            lambda: load_model(spec, trust_remote_code=remote, tokenizer=self.tokenizer, meta=True),
            self.method,
            self.quantize,
            self.autocast_dtype(),
            checkpoint_dtype(spec),
        )

    def base_dtype(self) -> torch.dtype:
        """fp32, unless the trainer runs ``bf16-true`` or ``16-true`` (then the base is loaded in that dtype)."""
        return precision.base_dtype(self._trainer.precision if self._trainer is not None else "32-true")

    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 under ``bf16-mixed``, fp16 under ``16-mixed``, else None."""
        return precision.autocast_dtype(self._trainer.precision if self._trainer is not None else "32-true")

    def _apply(self, fn: Any, recurse: bool = True) -> PeftLM:
        # Lightning's *-true precision plugins cast the whole module (``module.to(bf16)``); the trainable
        # tensors keep fp32 (mixed-precision master weights): they move between devices, never down in dtype.
        keep = {id(p) for p in self.parameters() if p.requires_grad and p.dtype == torch.float32}
        if not keep:
            return super()._apply(fn, recurse)

        def move_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(device=out.device) if id(t) in keep and out.dtype != t.dtype else out

        return super()._apply(move_only, recurse)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- loss ---------------------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def loss_and_accuracy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean next-token loss and accuracy over tokens whose label is not -100, and their count
        (:func:`litpeft.loss.answer_logits`: the LM head runs only where a token carries loss)."""
        logits, targets = answer_logits(self.model, batch)
        loss, correct = token_loss(logits, targets)
        n = int(targets.numel())
        return loss, correct.float() / n, n  # nan for a batch without loss tokens, as the loss

    #: Drop the attention mask of a right-padded batch (see :meth:`without_padding_mask`).
    drop_padding_mask: bool = True

    def without_padding_mask(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch without its attention mask when the mask only marks right padding.

        Under causal attention no real token sees a padding token to its right, so the mask changes
        nothing at positions that carry loss, and without it attention takes the plain causal path
        (on the CPU about a third faster for this model's shapes; see docs/benchmark.md).
        """
        mask = batch.get("attention_mask")
        if not (self.drop_padding_mask and SPEEDUPS.padding_mask) or mask is None or mask.dim() != 2:
            return batch
        if not bool((mask[:, 1:] <= mask[:, :-1]).all() and mask[:, 0].all()):
            return batch  # left padding or holes: the mask matters
        return {k: v for k, v in batch.items() if k != "attention_mask"}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, acc, n = self.loss_and_accuracy(self.without_padding_mask(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/token_acc", acc, batch_size=n)
        return self.weigh_by_tokens(self.with_method_loss(loss, n), n)

    def with_method_loss(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``loss`` plus the method's own training term (AdaLoRA's orthogonality regulariser), logged.

        Added before :meth:`weigh_by_tokens`: each micro-batch adds its share, once per optimizer step in all.
        """
        extra = self.method.training_loss(self.model)
        if extra is None:
            return loss
        self.log("train/method_loss", extra, batch_size=batch_size, sync_dist=True)
        return loss + extra

    def weigh_by_tokens(self, loss: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Make an optimizer step average over all its loss tokens, as one process with one batch would.

        Each micro-batch's loss is a mean over its own ``n`` loss tokens. DDP and FSDP average the ranks'
        gradients and Lightning's gradient accumulation averages the ``k`` micro-batches of a step, so a
        rank or micro-batch with fewer tokens would weigh each of them more. With ``W`` ranks, ``N1`` loss
        tokens in the step's first micro-batch of all ranks and ``N`` in the whole step, each micro-batch
        returns ``loss * n * W / N1`` and :meth:`on_before_optimizer_step` multiplies the gradients by
        ``k * N1 / N``: together the mean over all ``N`` tokens. One all-reduce of a scalar per micro-batch
        under DDP/FSDP; nothing changes on one device without accumulation.
        """
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        if world == 1 and accumulate == 1:
            return loss
        local = torch.tensor(float(num_tokens), device=loss.device)
        total = trainer.strategy.reduce(local.clone(), reduce_op="sum") if world > 1 else local
        if self._step_first_tokens is None:  # the first micro-batch of an optimizer step
            self._step_first_tokens, self._step_tokens = total.clamp(min=1.0), total
        else:
            self._step_tokens = self._step_tokens + total
        return loss * (local * world / self._step_first_tokens)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Finish :meth:`weigh_by_tokens` over the accumulated micro-batches (before gradient clipping).

        A subclass that overrides this hook must call ``super().on_before_optimizer_step(optimizer)``.
        """
        first, total = self._step_first_tokens, self._step_tokens
        self._step_first_tokens = self._step_tokens = None
        accumulate = self.trainer.accumulate_grad_batches
        if first is None or accumulate == 1:
            return
        factor = float(accumulate * first / total.clamp(min=1.0))  # a number: FSDP's grads are DTensors
        for group in optimizer.param_groups:  # the tensors the optimizer steps (FSDP's shards included)
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """The step, then the method's ``after_optimizer_step`` with the gradients still there (Lightning
        zeroes them at the next step's start) and before any callback (a checkpoint) sees the step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        total = self.trainer.estimated_stepping_batches  # inf when the run has no bound
        total = int(total) if math.isfinite(total) else 0
        self.method.after_optimizer_step(self.model, self.trainer.global_step + 1, total)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A quantized base on the CPU: give the heap back after each step (see :mod:`litpeft.heap`).

        A subclass that overrides this hook must call ``super().on_train_batch_end(...)``.
        """
        if self.quantize and self.device.type == "cpu":
            heap.trim()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, acc, n = self.loss_and_accuracy(self.without_padding_mask(batch))
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(acc, weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"val/loss": loss, "val/ppl": torch.exp(loss), "val/token_acc": self.val_acc.compute()},
            prog_bar=True,
            sync_dist=False,
        )
        self.val_loss.reset()
        self.val_acc.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"test/loss": loss, "test/ppl": torch.exp(loss), "test/token_acc": self.val_acc.compute()}
        )
        self.val_loss.reset()
        self.val_acc.reset()

    # -- optimization -------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Optimizer over the trainable tensors only; the scheduler (if any) steps every optimizer step.

        A parameter group with an ``lr_ratio`` (LoRA+'s ``B`` group) gets the optimizer's LR times it.
        """
        params: Any = self.trainable_parameters()
        if self.loraplus_lr_ratio is not None:
            params = loraplus_param_groups(self.model, self.loraplus_lr_ratio)
        optimizer = instantiate_class(params, self.optimizer_init)
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_ratio", 1.0)
        if not self.lr_scheduler_init:
            return optimizer
        scheduler = build_lr_scheduler(optimizer, self.lr_scheduler_init, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: trainable tensors only ----------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        return [TrainingRNG()]  # dropout masks after a resume are those of the uninterrupted run

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
        checkpoint["litpeft"] = {"model": self.model_spec, "method": self.method.config()}
        if method_state := self.method.training_state(self.model):
            checkpoint["litpeft"]["method_state"] = method_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if method_state := checkpoint.get("litpeft", {}).get("method_state"):
            self.method.load_training_state(self.model, method_state)

    def on_fit_end(self) -> None:
        if was_preempted(self.trainer):
            return  # stopped for a requeue: the run is not finished, its resume checkpoint is what counts
        tensors, fingerprint = full_adapter(self)  # a collective under FSDP: every rank gathers
        target = Path(self.adapter_dir) if self.adapter_dir else Path(run_dir(self.trainer)) / "adapter"
        if self.trainer.is_global_zero:
            datamodule = getattr(self.trainer, "datamodule", None)
            save_adapter(target, self, getattr(datamodule, "style", None), tensors, fingerprint)
            self.print(f"adapter written to {target}")
