"""What LoHa and LoKr share (the LyCORIS family as Hugging Face peft implements it): a layer that adds
``Delta W x`` for a ``Delta W`` rebuilt from small factors, peft's rank and module dropout, the merge, and
the checks and peft export of the common options.

``Delta W`` is ``out x in`` whatever the base layer (``nn.Linear`` or GPT-2's ``Conv1D``); the forward
adds ``Delta W x`` to ``base_layer(x)``, as peft's, but from the factors where that is cheaper than
forming ``Delta W`` (peft forms it in every forward). In training, as peft does: the whole update is
skipped with probability ``module_dropout`` (one draw per layer and step), and each output row of
``Delta W`` is dropped with probability ``rank_dropout`` (the kept rows rescaled by 1 / their share where
the method says so). The draws come from torch's CPU generator in peft's order, so the same seed gives
peft's masks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods.base import (
    PeftMethod,
    _is_int,
    check_arg,
    check_target_modules,
    find_targets,
    merge_layers,
    peft_target_names,
    replace_module,
)
from litpeft.methods.linear import DeltaWeightLayer, in_out_features, layer_device


class LycorisLinear(nn.Module, DeltaWeightLayer):
    """``base_layer(x) + Delta W x``; a subclass creates the factors and rebuilds ``Delta W``."""

    #: whether the rows kept by rank dropout are rescaled by 1 / their share (LoHa always; LoKr on request)
    rank_dropout_scale: bool = True

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.scaling = alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def factor(self, *shape: int) -> nn.Parameter:
        """A new fp32 factor on the base layer's device (values set by the subclass's init)."""
        return nn.Parameter(torch.empty(shape, device=layer_device(self.base_layer), dtype=torch.float32))

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """``Delta W x`` (a subclass may compute it without forming ``Delta W``)."""
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        if self.training and not torch.rand(1) > self.module_dropout:  # peft draws it every training step
            return result
        out = self.delta_output(x)
        if self.training and self.rank_dropout:
            # a dropped row of Delta W is a dropped output feature of Delta W x
            drop = (torch.rand(self.out_features) > self.rank_dropout).float()
            if self.rank_dropout_scale:  # (all rows dropped: peft's 0 / 0 is NaN, here the update is 0)
                drop = drop / drop.mean().clamp_min(1 / drop.numel())
            out = out * drop.to(out.device)
        return result + out.to(result.dtype)


class LycorisMethod(PeftMethod):
    """The options LoHa and LoKr share (peft's ``LycorisConfig`` fields), their injection, merge and export.

    A subclass sets ``name``, ``layer`` (its :class:`LycorisLinear`), ``peft_type`` and stores its own
    options; :meth:`layer_args` and :meth:`peft_args` add them to the layer's and the peft config's.
    """

    layer: ClassVar[type[LycorisLinear]]
    peft_type: ClassVar[str]
    mergeable = True
    exportable_to_peft = True

    def check_common(
        self,
        r: int,
        alpha: float,
        rank_dropout: float,
        module_dropout: float,
        target_modules: str | list[str],
    ) -> None:
        """Check and store the shared options (``Delta W`` is scaled by ``alpha / r``)."""
        label = type(self).__name__
        check_arg(_is_int(r) and r > 0, "r", r, f"{label}'s rank must be a positive integer")
        check_arg(
            alpha > 0, "alpha", alpha, f"{label}'s alpha must be positive (Delta W is scaled by alpha / r)"
        )
        check_arg(0 <= rank_dropout < 1, "rank_dropout", rank_dropout, "a dropout probability is in [0, 1)")
        check_arg(
            0 <= module_dropout < 1, "module_dropout", module_dropout, "a dropout probability is in [0, 1)"
        )
        check_target_modules(target_modules)
        self.r, self.alpha, self.rank_dropout, self.module_dropout = r, alpha, rank_dropout, module_dropout
        self.target_modules = (
            list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        )

    def layer_args(self) -> dict[str, Any]:
        """The layer's arguments besides the base layer and the shared options."""
        return {}

    def peft_args(self) -> dict[str, Any]:
        """The peft config's fields besides the shared ones."""
        return {}

    def inject(self, model: PreTrainedModel) -> None:
        # peft's LyCORIS layers also take nn.Conv1d / nn.Conv2d (convolutions); no causal LM has them
        for name in find_targets(model, self.target_modules, (nn.Linear, Conv1D)):
            layer = self.layer(
                model.get_submodule(name),
                self.r,
                self.alpha,
                self.rank_dropout,
                self.module_dropout,
                **self.layer_args(),
            )
            replace_module(model, name, layer)

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Add each layer's ``Delta W`` to its base weight and remove the method's layers."""
        return merge_layers(model, self.layer)

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, self.layer)}
        conv1d = sorted(n for n, m in layers.items() if isinstance(m.base_layer, Conv1D))
        if conv1d:
            raise LitPeftError(
                f"{self.name}: peft's {type(self).__name__} wraps nn.Linear layers only, not GPT-2's Conv1D "
                f"({conv1d[0]}), so it cannot load this adapter; litpeft merge folds it into the model instead"
            )
        config = {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "target_modules": peft_target_names(model, sorted(layers)),
            "use_effective_conv2d": False,
            "init_weights": True,
            "inference_mode": True,
            **self.peft_args(),
        }
        return config, {"base_model.model." + k: v for k, v in state.items()}
