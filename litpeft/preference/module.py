"""``PreferenceLM``: preference tuning (DPO, IPO, ORPO, SimPO) of any PEFT method, as a ``PeftLM`` subclass.

A batch holds ``2B`` rows, the ``B`` chosen answers then the ``B`` rejected ones, each after the same prompt,
with labels ``-100`` outside the answer (:mod:`litpeft.preference.data`; TRL's layout). One forward pass of
the policy scores all ``2B`` answers; DPO and IPO add one pass of the reference policy, without gradients
(or read its log-probabilities from a cache scored once, ``precompute_reference``: :mod:`.reference`).

The reference costs no second model. Without ``init_adapter`` it is the base model: the same network with
every method layer switched off (:func:`~litpeft.methods.base.adapters_disabled`). With ``init_adapter`` (an
SFT adapter directory to start from) it is that SFT policy: the module keeps a frozen copy of only the
adapter's tensors (the method's trainable tensors as loaded, a few MB) and copies them into the trainable
tensors for the reference pass, then copies the current values back. The reference pass runs before the
policy pass, so autograd never sees the tensors change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from jsonargparse import lazy_instance
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from litpeft.adapter_dir import base_fingerprints, read_adapter_config, read_adapter_weights
from litpeft.errors import LitPeftError, check
from litpeft.loss import IGNORE_INDEX, answer_logits
from litpeft.methods import LoRA, PeftMethod
from litpeft.methods.base import adapters_disabled
from litpeft.module import PeftLM
from litpeft.preference import losses
from litpeft.preference.data import PairSamples, collate_pairs
from litpeft.preference.losses import NEEDS_REFERENCE, LossType, PairLogps, PairLoss
from litpeft.preference.reference import ReferenceCache, score_pairs
from litpeft.quantize import QuantMode

log = logging.getLogger(__name__)


def token_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every label token, ``(rows, length - 1)`` (0 where the label is -100), and that mask.

    The LM head runs only where a token carries a label (:func:`litpeft.loss.answer_logits`).
    """
    logits, targets = answer_logits(model, batch)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps), mask


def pair_logps(logps: torch.Tensor, mask: torch.Tensor) -> PairLogps:
    """Per-pair sums and token counts of a ``[chosen; rejected]`` batch's answer log-probabilities."""
    sums, counts = logps.sum(-1), mask.sum(-1)
    n = sums.shape[0] // 2
    return PairLogps(sums[:n], sums[n:], counts[:n], counts[n:])


class PreferenceLM(PeftLM):
    """A causal LM plus one PEFT method, tuned on preference pairs (chosen vs rejected answer).

    Args:
        model, method, quantize, gradient_checkpointing, trust_remote_code, adapter_dir: as for
            :class:`~litpeft.module.PeftLM`.
        loss: ``dpo`` (Rafailov et al. 2023; sigmoid, with ``label_smoothing``), ``ipo`` (Azar et al.
            2023), ``orpo`` (Hong et al. 2024; reference-free, SFT term included) or ``simpo`` (Meng et al.
            2024; reference-free, length-normalised).
        beta: DPO/IPO/SimPO's ``beta`` (IPO's ``tau``); ORPO's ``lambda`` (weight of the odds-ratio term).
            Typical: 0.1 (DPO, ORPO), 0.1-1 (IPO), 2-2.5 (SimPO).
        label_smoothing: the probability that a pair's label is flipped (conservative DPO), for ``dpo`` and
            ``simpo``; in ``[0, 0.5)``.
        simpo_gamma: SimPO's target reward margin ``gamma``.
        sft_on_prompt: ORPO's SFT term over the whole chosen sequence, prompt included (as TRL's
            ``ORPOTrainer``); default: over the chosen answer only (the paper's ``L_SFT`` of ``y_w`` given
            ``x``, and litpeft's SFT).
        init_adapter: an adapter directory (e.g. an SFT run's) to start from; the reference policy is then
            that adapter, not the bare base. Its method's config must match ``method``.
        precompute_reference: ``dpo``/``ipo``: score every train and val pair with the reference policy once
            (the first step of each split) and read the cache instead of a second forward pass each step
            (:mod:`litpeft.preference.reference`; TRL's ``precompute_ref_log_probs``).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        method: PeftMethod = lazy_instance(LoRA),
        quantize: QuantMode | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        adapter_dir: str | None = None,
        loss: LossType = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        sft_on_prompt: bool = False,
        init_adapter: str | None = None,
        precompute_reference: bool = False,
    ) -> None:
        check(loss in losses.LOSSES, "model.init_args.loss", loss, f"one of {', '.join(losses.LOSSES)}")
        check(beta > 0, "model.init_args.beta", beta, "a positive number")
        check(0 <= label_smoothing < 0.5, "model.init_args.label_smoothing", label_smoothing, "in [0, 0.5)")
        if precompute_reference and loss not in NEEDS_REFERENCE:
            raise LitPeftError(
                f"model.init_args.precompute_reference: loss '{loss}' is reference-free; "
                f"only {' and '.join(NEEDS_REFERENCE)} have reference log-probabilities to precompute"
            )
        if init_adapter is not None:
            read_adapter_config(init_adapter)  # one line now, not after the base is loaded
        super().__init__(model, method, quantize, gradient_checkpointing, trust_remote_code, adapter_dir)
        self.loss, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self.simpo_gamma, self.sft_on_prompt, self.init_adapter = simpo_gamma, sft_on_prompt, init_adapter
        #: the starting adapter's tensors (by parameter name), the reference policy; None: the bare base
        self.reference_tensors: dict[str, torch.Tensor] | None = None
        self.precompute_reference = precompute_reference
        self.reference_cache = ReferenceCache()
        self._cache_checked: set[str] = set()  # splits whose cache was matched to this run's data

    # -- model --------------------------------------------------------------------------------------
    def build_model(self, meta: bool = False) -> PreTrainedModel:
        """:meth:`PeftLM.build_model`, then the ``init_adapter``'s tensors loaded into the method."""
        model = super().build_model(meta)
        if self.init_adapter is None or meta:
            return model
        meta_cfg = read_adapter_config(self.init_adapter)
        known = meta_cfg.get("base_fingerprint")
        if known and known not in base_fingerprints(model):
            raise LitPeftError(
                f"model.init_args.init_adapter '{self.init_adapter}' was trained on base "
                f"'{meta_cfg.get('base_model')}', not on '{self.model_spec}'"
            )
        self.method.load_adapter_state_dict(model, read_adapter_weights(self.init_adapter))
        if not any(p.requires_grad for p in model.parameters()):
            raise LitPeftError(
                f"model.init_args.init_adapter: method '{self.method.name}' leaves nothing to train after "
                "loading an adapter; start this method from scratch"
            )
        return model

    def configure_model(self) -> None:
        """:meth:`PeftLM.configure_model`; with ``init_adapter``, the frozen copy of its tensors is taken
        here, after FSDP sharded them (each rank copies its shards) and before a checkpoint is restored."""
        fresh = self.model is None
        super().configure_model()
        if fresh and self.init_adapter is not None:
            self.reference_tensors = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """Inside the block the model is the reference policy, in eval mode (no dropout), without grads."""
        model = self.model
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.reference_tensors is None:
                    with adapters_disabled(model):
                        yield
                    return
                params = dict(model.named_parameters())
                current = {n: params[n].detach().clone() for n in self.reference_tensors}
                for n, ref in self.reference_tensors.items():
                    params[n].copy_(ref)  # across devices when the module moved after the copy was taken
                try:
                    yield
                finally:
                    for n, value in current.items():
                        params[n].copy_(value)
        finally:
            model.train(training)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> PairLogps:
        """The reference policy's answer log-probabilities of a batch (one no-grad forward pass)."""
        with self.reference_policy():
            return pair_logps(*token_logps(self.model, self.without_padding_mask(batch)))

    def cache_reference(self, split: str, dataset: PairSamples, batch_size: int) -> None:
        """Score every pair of ``dataset`` with the reference policy into the cache of ``split``, unless it
        holds this data already (restored from a checkpoint). Every rank scores every pair (under FSDP each
        forward pass is a collective): one no-grad pass over the data, the wall time of one process."""
        fingerprint = dataset.fingerprint()
        self._cache_checked.add(split)
        if self.reference_cache.has(split, fingerprint):
            return
        log.info("scoring the reference log-probabilities of %d %s pairs (once)", len(dataset), split)
        pad_id = self.tokenizer.pad_token_id
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=partial(collate_pairs, pad_id=pad_id))
        with torch.inference_mode(False):  # a cache scored in a validation step is used by training steps
            logps = score_pairs(loader, len(dataset), self.reference_logps, self.device)
        self.reference_cache.store(split, fingerprint, logps)

    def cached_reference(self, batch: dict[str, torch.Tensor], split: str | None) -> PairLogps | None:
        """The batch's reference log-probabilities from the cache, scoring its split first if needed;
        None without ``precompute_reference``, for a split other than train/val or a batch without keys."""
        if not self.precompute_reference or split not in ("train", "val") or "pair_index" not in batch:
            return None
        if split not in self._cache_checked:  # once per fit/validate: the split's data may be new
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            dataset = getattr(datamodule, f"{split}_data", None)
            if not isinstance(dataset, PairSamples):
                raise LitPeftError(
                    "model.init_args.precompute_reference needs the pairs of a "
                    "litpeft.preference.PreferenceDataModule (data:) to score them before training"
                )
            self.cache_reference(split, dataset, datamodule.eval_batch_size)
        return self.reference_cache.lookup(split, batch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._cache_checked.clear()

    # -- loss ---------------------------------------------------------------------------------------
    def preference_loss(
        self, batch: dict[str, torch.Tensor], split: str | None = None
    ) -> tuple[torch.Tensor, PairLoss, PairLogps]:
        """The mean loss over the batch's pairs, the per-pair terms, and the policy's answer log-probs.

        ``split`` (``train``/``val``) selects the reference cache under ``precompute_reference``."""
        attention = batch.get("attention_mask")
        reference = None
        if self.loss in NEEDS_REFERENCE:  # first: the reference pass may swap the adapter's tensors
            reference = self.cached_reference(batch, split)
            if reference is None:
                reference = self.reference_logps(batch)
        batch = self.without_padding_mask(batch)
        if self.loss == "orpo" and self.sft_on_prompt:
            return self._orpo_on_sequence(batch, attention)
        policy = pair_logps(*token_logps(self.model, batch))
        if self.loss == "dpo":
            out = losses.dpo(policy, reference, self.beta, self.label_smoothing)
        elif self.loss == "ipo":
            out = losses.ipo(policy, reference, self.beta)
        elif self.loss == "simpo":
            out = losses.simpo(policy, self.beta, self.simpo_gamma, self.label_smoothing)
        else:
            out = losses.orpo(policy, self.beta)
            nll = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
            out.extra["nll"] = nll.detach()
            return nll + out.losses.mean(), out, policy
        return out.losses.mean(), out, policy

    def _orpo_on_sequence(
        self, batch: dict[str, torch.Tensor], attention: torch.Tensor | None
    ) -> tuple[torch.Tensor, PairLoss, PairLogps]:
        """ORPO with its SFT term over the chosen rows' every real token (prompt included), as TRL's."""
        labels = batch["labels"]
        n = labels.shape[0] // 2
        real = torch.ones_like(labels, dtype=torch.bool) if attention is None else attention.bool()
        scored = labels.clone()
        scored[:n] = torch.where(real[:n], batch["input_ids"][:n], IGNORE_INDEX)
        logps, mask = token_logps(self.model, {**batch, "labels": scored})
        answer = labels[:, 1:] != IGNORE_INDEX
        policy = pair_logps(logps * answer, answer)
        out = losses.orpo(policy, self.beta)
        nll = -logps[:n].sum() / mask[:n].sum().clamp(min=1)
        out.extra["nll"] = nll.detach()
        return nll + out.losses.mean(), out, policy

    def metrics(self, out: PairLoss, policy: PairLogps) -> dict[str, torch.Tensor]:
        """What is logged each step (means over the batch's pairs), TRL's names under ``train/``/``val/``."""
        margin = out.chosen_rewards - out.rejected_rewards
        return {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margin": margin.mean(),
            "rewards/accuracy": (margin > 0).float().mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
            **out.extra,
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, out, policy = self.preference_loss(batch, "train")
        pairs = int(out.losses.shape[0])
        # sync_dist: under DDP/FSDP the logged values are means over every rank's pairs, as in one process
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs, sync_dist=True)
        for key, value in self.metrics(out, policy).items():
            prog = key == "rewards/accuracy"
            self.log(f"train/{key}", value, prog_bar=prog, batch_size=pairs, sync_dist=True)
        # every pair weighs the same across micro-batches and ranks
        return self.weigh_by_tokens(self.with_method_loss(loss, pairs), pairs)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        loss, out, policy = self.preference_loss(batch, split)
        pairs = int(out.losses.shape[0])
        values = {"loss": loss, **self.metrics(out, policy)}
        for key, value in values.items():
            prog = key in ("loss", "rewards/accuracy")
            self.log(f"{split}/{key}", value, prog_bar=prog, batch_size=pairs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        pass  # logged per step (Lightning averages over the epoch, weighted by pairs)

    def on_test_epoch_end(self) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["litpeft"]["preference"] = {
            "loss": self.loss,
            "init_adapter": self.init_adapter,
            "reference_cache": self.reference_cache.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run reads the reference cache it had (rescored if the data changed)."""
        saved = checkpoint.get("litpeft", {}).get("preference", {})
        if self.precompute_reference and saved.get("reference_cache"):
            self.reference_cache.load_state_dict(saved["reference_cache"])
