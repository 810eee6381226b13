"""LayerNorm tuning (Zhao et al. 2023, arXiv 2312.11420): train only the normalization layers.

Every other weight stays frozen; each selected norm ``y = g * (x - mu) / sigma + b`` (RMSNorm:
``y = g * x / rms(x)``) trains its gain ``g`` and bias ``b`` (paper sec. 3, "LayerNorm tuning": the
LayerNorm weights of each attention block, and the final one). They start at their base values, so the
model starts exactly at the base model. A tuned norm is a plain norm with other values: :meth:`merge`
puts it in place of the base one. The trained copy hangs under the slot ``ln_tuning_layers``
(:class:`~litpeft.methods.layout.TrainableNorm`), which is peft's ``LN_TUNING`` name, so the export is a
rename of the prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from litpeft.methods.base import (
    PeftMethod,
    check_target_modules,
    find_targets,
    peft_target_names,
    replace_module,
)
from litpeft.methods.layout import TrainableNorm, is_norm

SLOT = "ln_tuning_layers"  # peft's name of the tuned copy: part of the saved format, never rename it


class LNTuning(PeftMethod):
    """LayerNorm tuning: the selected LayerNorm / RMSNorm layers train, nothing else.

    Args:
        target_modules: the norms to train: names (suffix match) or a regex (full match); ``null``: every
            normalization layer of the model (each layer's, the final one, and per-head q/k norms where
            the family has them).
    """

    name = "ln_tuning"
    learning_rate = 1e-3  # configs/ln_tuning.yaml
    mergeable = True
    exportable_to_peft = True

    def __init__(self, target_modules: str | list[str] | None = None) -> None:
        if target_modules is not None:
            check_target_modules(target_modules)
        self.target_modules = list(target_modules) if isinstance(target_modules, tuple) else target_modules

    def inject(self, model: PreTrainedModel) -> None:
        kinds = tuple({type(m) for m in model.modules() if is_norm(m)})
        names = [n for n, m in model.named_modules() if is_norm(m)]
        if self.target_modules is not None:
            names = find_targets(model, self.target_modules, kinds)
        for name in names:
            replace_module(model, name, TrainableNorm(model.get_submodule(name), SLOT))

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Put each tuned norm (in the base's dtype) in place of its base norm."""
        for name, module in list(model.named_modules()):
            if isinstance(module, TrainableNorm) and module.slot == SLOT:
                replace_module(model, name, module.merged())
        model.requires_grad_(False)
        return model

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tuned = sorted({k.split(f".{SLOT}.", 1)[0] for k in state if f".{SLOT}." in k})
        config = {
            "peft_type": "LN_TUNING",
            "task_type": "CAUSAL_LM",
            "target_modules": peft_target_names(model, tuned),
            "inference_mode": True,
        }
        return config, {"base_model.model." + k: v for k, v in state.items()}
