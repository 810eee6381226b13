"""AdaLoRA's rank budget (Zhang et al. 2023, arXiv 2303.10512, sec. 3.2-3.3): which singular values live.

Every entry ``w`` of ``P``, ``Lambda`` and ``Q`` gets an importance, its sensitivity smoothed (eqs. 8-10)::

    I(w) = |w * grad w|,   I_bar = beta1 I_bar + (1 - beta1) I,   U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|

and ``s(w) = I_bar * U_bar``. A triplet ``(P_i, lambda_i, Q_i)`` scores (eq. 11)
``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)``. The budget, the number of singular values kept over
all layers, falls from ``init_r * n`` to ``target_r * n`` on a cubic schedule between steps ``tinit`` and
``total_step - tfinal`` (eq. 12); every ``delta_t`` steps the ``lambda_i`` of the lowest-scoring triplets are
set to 0 (the triplet at the threshold too, as peft). At ``total_step - tfinal`` the final mask is taken
and re-applied after every later step. Steps, thresholds and ties are Hugging Face peft's
``RankAllocator`` with ``AdaLoraModel.update_and_allocate``, so the same weights and gradients give the same
budgets and masks (tests/methods/test_adalora.py drives both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from litpeft.errors import LitPeftError

SLOT = "adalora_budget"  # where the allocator hangs on the model (no tensors of its own: nothing saved)
FACTORS = ("lora_A", "lora_E", "lora_B")  # Q (r x in), Lambda (r x 1), P (out x r)


class RankAllocator(nn.Module):
    """The importance EMAs of every adapted layer's ``P``, ``Lambda``, ``Q`` and the budget schedule.

    Args:
        layers: name -> adapted layer (with ``lora_A``, ``lora_E``, ``lora_B``); kept as references.
        target_r, tinit, tfinal, delta_t, beta1, beta2: as :class:`~litpeft.methods.adalora.AdaLoRA`'s.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        target_r: int,
        tinit: int,
        tfinal: int,
        delta_t: int,
        beta1: float,
        beta2: float,
    ) -> None:
        super().__init__()
        self.__dict__["layers"] = dict(sorted(layers.items()))  # references, not children
        self.tinit, self.tfinal, self.delta_t, self.beta1, self.beta2 = tinit, tfinal, delta_t, beta1, beta2
        self.init_budget = sum(layer.lora_E.shape[0] for layer in layers.values())
        self.target_budget = target_r * len(layers)
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None  # name -> kept triplets, once masked

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{n}.{f}", getattr(layer, f)) for n, layer in self.layers.items() for f in FACTORS]

    def check_whole_tensors(self) -> None:
        if any(isinstance(p, DTensor) for _, p in self._params()):
            raise LitPeftError(
                "AdaLoRA ranks singular values over whole tensors: train it with DDP, not FSDP (sharded tensors)"
            )

    def check_schedule(self, total_step: int) -> None:
        self.check_whole_tensors()
        if total_step <= 0:
            raise LitPeftError(
                "AdaLoRA needs total_step: this run has no step bound (set max_steps or total_step)"
            )
        if self.tinit >= total_step - self.tfinal:
            raise LitPeftError(
                f"AdaLoRA: tinit {self.tinit} + tfinal {self.tfinal} leave no budgeting phase in a {total_step}-step "
                "schedule (total_step; null: the run's steps); lower them or train longer"
            )

    def budget(self, step: int, total_step: int) -> tuple[int, bool]:
        """The budget at ``step`` (eq. 12) and whether this step masks to it."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > total_step - self.tfinal:
            return self.target_budget, True
        left = 1 - (step - self.tinit) / (total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % self.delta_t == 0

    def finite_gradients(self) -> bool:
        grads = [p.grad for _, p in self._params() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    @torch.no_grad()
    def update_importance(self) -> None:
        """Eqs. 8-10 on every entry, from the current weights and gradients."""
        for name, p in self._params():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ipt = (p * grad).abs()
            avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
            avg = self.beta1 * avg + (1 - self.beta1) * ipt
            self.exp_avg_ipt[name] = avg
            self.exp_avg_unc[name] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Eq. 11: each layer's triplet scores, shape ``(r,)``."""

        def s(key: str) -> torch.Tensor:
            return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

        out = {}
        for n in self.layers:
            q = s(f"{n}.lora_A").mean(dim=1, keepdim=True)
            p = s(f"{n}.lora_B").mean(dim=0).view(-1, 1)
            out[n] = s(f"{n}.lora_E").view(-1) + torch.cat([q, p], dim=1).sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``lambda_i`` of all but the ``budget`` best triplets; the kept triplets per layer."""
        scores = self.scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        pattern = {}
        for n, layer in self.layers.items():
            drop = (scores[n] <= threshold).view(-1, 1)
            layer.lora_E.masked_fill_(drop, 0.0)
            pattern[n] = (~drop).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_with_pattern(self) -> None:
        for n, layer in self.layers.items():
            keep = torch.tensor(self.rank_pattern[n], device=layer.lora_E.device).view(-1, 1)
            layer.lora_E.masked_fill_(~keep, 0.0)

    def step(self, step: int, total_step: int) -> int:
        """After optimizer step ``step``: update the importance, mask to the budget; returns the budget."""
        self.check_schedule(total_step)
        final = total_step - self.tfinal
        budget, mask = self.budget(step, total_step)
        if step < final:
            if (
                self.finite_gradients()
            ):  # an fp16 loss scaler skipped this step: its inf would stay in the EMAs
                self.update_importance()
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
        elif step == final:
            if not self.exp_avg_ipt:  # the run starts at the final step: no importance yet (as peft's zeros)
                self.update_importance()
            self.rank_pattern = self.mask_to_budget(budget)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.rank_pattern is not None:
            self.mask_with_pattern()
        return budget

    def state(self) -> dict[str, Any]:
        return {
            "exp_avg_ipt": self.exp_avg_ipt,
            "exp_avg_unc": self.exp_avg_unc,
            "rank_pattern": self.rank_pattern,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        devices = dict(self._params())
        self.exp_avg_ipt = {k: v.to(devices[k].device) for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: v.to(devices[k].device) for k, v in state["exp_avg_unc"].items()}
        self.rank_pattern = state["rank_pattern"]
