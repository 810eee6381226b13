"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, arXiv 2303.10512).

Each adapted ``W`` gets its update in SVD form (eq. 3)::

    h = W x + (alpha / r) * P Lambda Q x,      P: out x r,  Lambda = diag(lambda): r,  Q: r x in,  lambda = 0 at init

so the wrapped model starts exactly at the base model. ``P`` and ``Q`` are kept near orthogonal by a
regulariser added to the training loss (eq. 4), ``orth_reg_weight * R(P, Q)``; as in the authors' code and
Hugging Face peft, ``R`` is the mean over all ``P`` and ``Q`` of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``
(the norms, not their squares as eq. 4 writes them). During training the rank budget shrinks from
``init_r`` to ``target_r`` per layer on average: the least important singular values are set to 0
(:mod:`litpeft.methods.adalora_budget`, eqs. 8-12), once per optimizer step, after the step and before the
gradients are zeroed (:meth:`AdaLoRA.after_optimizer_step`); that state is saved in every checkpoint.

The layers hold peft's ``lora_A`` (``Q``), ``lora_E`` (``lambda``), ``lora_B`` (``P``) and its scaling
``alpha / (init_r + 1e-5)``; the peft export keeps only the living singular values (``rank_pattern``).
A weight update: :meth:`AdaLoRA.merge` adds ``P Lambda Q`` to each base weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.methods.adalora_budget import SLOT, RankAllocator
from litpeft.methods.base import (
    Dropout,
    PeftMethod,
    _is_int,
    check_arg,
    check_target_modules,
    find_targets,
    merge_layers,
    peft_target_names,
    replace_module,
)
from litpeft.methods.layout import attach, attached, detach
from litpeft.methods.linear import DeltaWeightLayer, in_out_features, layer_device


class SVDLinear(nn.Module, DeltaWeightLayer):
    """``base_layer(x) + P (lambda * (Q dropout(x))) * alpha / (r + 1e-5)`` (peft's ``SVDLinear``)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = in_out_features(base_layer)
        f = {"device": layer_device(base_layer), "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.randn(r, in_features, **f) * 0.02)  # Q; N(0, 0.02) as peft
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **f))  # lambda
        self.lora_B = nn.Parameter(torch.randn(out_features, r, **f) * 0.02)  # P
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha if alpha > 0 else float(r)
        self.ranknum = float(r)  # peft's divisor: the initial rank, whatever is masked later

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        h = self.lora_dropout(x).to(self.lora_A.dtype) @ (self.lora_A * self.lora_E).T @ self.lora_B.T
        return result + (h * self.scaling / (self.ranknum + 1e-5)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``P Lambda Q`` scaled, as ``(out, in)``."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


class AdaLoRA(PeftMethod):
    """AdaLoRA on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``).

    Args:
        init_r: the rank each layer starts with.
        target_r: the average rank left at the end (the final budget is ``target_r`` times the layer count).
        alpha: the update is scaled by ``alpha / init_r`` (peft's ``lora_alpha``).
        dropout: dropout on the input of the update.
        target_modules: layer names (suffix match), a regex (full match) or ``"all-linear"``, as LoRA's (the
            paper adapts every weight matrix).
        tinit: steps at the full budget before pruning starts (eq. 12's ``t_i``).
        tfinal: steps at the final budget at the end (``t_f``); the final mask is taken at step
            ``total_step - tfinal`` (steps count from 1).
        delta_t: mask every this many steps while the budget falls (``Delta_T``).
        beta1: EMA factor of the sensitivity (eq. 9).
        beta2: EMA factor of the uncertainty (eq. 10).
        orth_reg_weight: the regulariser's coefficient (eq. 4's ``gamma``).
        total_step: the schedule's length ``T``; null: the trainer's number of optimizer steps (then
            written into the adapter's config).
    """

    name = "adalora"
    learning_rate = 5e-3  # configs/adalora.yaml (1e-3 barely moved in a short run)
    mergeable = True
    exportable_to_peft = True

    def __init__(
        self,
        init_r: int = 12,
        target_r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        tinit: int = 0,
        tfinal: int = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_step: int | None = None,
    ) -> None:
        check_arg(
            _is_int(init_r) and init_r > 0, "init_r", init_r, "the initial rank must be a positive integer"
        )
        check_arg(
            _is_int(target_r) and 0 < target_r < init_r,
            "target_r",
            target_r,
            f"AdaLoRA prunes from init_r down: an integer in [1, {init_r})",
        )
        check_arg(0 <= dropout < 1, "dropout", dropout, "a dropout probability is in [0, 1)")
        check_target_modules(target_modules)
        for key, value in (("tinit", tinit), ("tfinal", tfinal)):
            check_arg(_is_int(value) and value >= 0, key, value, "a number of steps (>= 0)")
        check_arg(_is_int(delta_t) and delta_t > 0, "delta_t", delta_t, "a number of steps (>= 1)")
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            check_arg(0 < value < 1, key, value, "an EMA factor in (0, 1)")
        check_arg(orth_reg_weight >= 0, "orth_reg_weight", orth_reg_weight, "a coefficient >= 0")
        check_arg(
            total_step is None or (_is_int(total_step) and tinit < total_step - tfinal),
            "total_step",
            total_step,
            f"null or more than tinit + tfinal ({tinit + tfinal}) steps",
        )
        self.init_r, self.target_r, self.alpha, self.dropout = init_r, target_r, alpha, dropout
        self.target_modules = (
            list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        )
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg_weight, self.total_step = (
            beta1,
            beta2,
            orth_reg_weight,
            total_step,
        )

    def inject(self, model: PreTrainedModel) -> None:
        layers = {}
        for name in find_targets(model, self.target_modules, (nn.Linear, Conv1D)):
            layers[name] = SVDLinear(model.get_submodule(name), self.init_r, self.alpha, self.dropout)
            replace_module(model, name, layers[name])
        args = (self.target_r, self.tinit, self.tfinal, self.delta_t, self.beta1, self.beta2)
        attach(model, SLOT, RankAllocator(layers, *args))

    # -- training: the regulariser, the budget ---------------------------------------------------------
    def training_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``orth_reg_weight * R(P, Q)`` (eq. 4, as peft: the mean Frobenius norm of ``Q Q^T - I``, ``P^T P - I``)."""
        # refuse FSDP at the first training step, before R fails on sharded tensors with a traceback
        attached(model, SLOT).check_whole_tensors()
        if self.orth_reg_weight == 0:
            return None
        norms = []
        for layer in svd_layers(model).values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                norms.append(torch.linalg.matrix_norm(cov - eye))
        return self.orth_reg_weight * torch.stack(norms).mean()

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        attached(model, SLOT).step(step, self.total_step or total_steps)
        self.total_step = self.total_step or total_steps  # the adapter's config records the schedule it ran

    def training_state(self, model: nn.Module) -> dict[str, Any]:
        return attached(model, SLOT).state()

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        attached(model, SLOT).load_state(state)

    # -- after training --------------------------------------------------------------------------------
    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Add each layer's ``P Lambda Q`` to its weight; remove the AdaLoRA layers and the allocator."""
        merge_layers(model, SVDLinear)
        detach(model, SLOT)
        return model

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft's ``ADALORA`` adapter as peft saves a trained one: only the singular values that are not 0,
        and the ``rank_pattern`` that says which (peft resizes the layers to it when it loads)."""
        adapted = sorted(k.rsplit(".lora_E", 1)[0] for k in state if k.endswith(".lora_E"))
        tensors, pattern = {}, {}
        for name in adapted:
            keep = state[f"{name}.lora_E"].view(-1) != 0
            pattern[f"{name}.lora_E"] = keep.tolist()
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A"] = state[f"{name}.lora_A"][keep]
            tensors[f"{prefix}.lora_E"] = state[f"{name}.lora_E"][keep]
            tensors[f"{prefix}.lora_B"] = state[f"{name}.lora_B"][:, keep]
        config = {
            "peft_type": "ADALORA",
            "task_type": "CAUSAL_LM",
            "init_r": self.init_r,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": peft_target_names(model, adapted),
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.delta_t,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            # peft's config demands a valid schedule even to load (null: an adapter that never trained)
            "total_step": self.total_step or self.tinit + self.tfinal + 1,
            "rank_pattern": pattern,
            "fan_in_fan_out": isinstance(model.get_submodule(adapted[0]).base_layer, Conv1D),
            "init_lora_weights": True,
            "inference_mode": True,
        }
        return config, tensors
