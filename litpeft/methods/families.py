"""Which method cannot work on which model family: the one-line refusals ``PeftMethod.apply`` raises.

Each rule looks at the model's structure, not its name, so a new architecture built the same way is
refused (or accepted) for the same reason. The README's method x family table is generated from the
matrix test (``scripts/method_family_table.py``), which asserts these refusals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from litpeft.errors import LitPeftError

LLAMA_ADAPTERS = ("llama_adapter", "llama_adapter_v2")


def expert_tensors(model: nn.Module) -> list[str]:
    """Names of 3-D parameters (``experts x out x in``): a mixture of experts whose experts are one
    tensor each (transformers 5's ``Qwen3MoeExperts``, ``MixtralExperts``), not ``nn.Linear`` layers."""
    return [name for name, p in model.named_parameters() if p.dim() == 3]


def _expert_targets(method: Any, model: PreTrainedModel) -> str | None:
    """``target_modules`` naming an expert tensor would otherwise select nothing there, silently."""
    resolve = getattr(method, "targets", None)  # a method whose None means default names ((IA)^3)
    targets = resolve() if callable(resolve) else getattr(method, "target_modules", None)
    experts = expert_tensors(model)
    if not experts or targets is None or targets == "all-linear":
        return None
    if isinstance(targets, str):
        named = [n for n in experts if re.fullmatch(targets, n) or re.fullmatch(targets, n.rsplit(".", 1)[0])]
    else:
        named = [n for n in experts if any(n == t or n.endswith("." + t) for t in targets)]
    if not named:
        return None
    leaves = sorted({n.rsplit(".", 1)[-1] for n in named})
    return (
        f"{method.name}: {type(model).__name__}'s experts hold {', '.join(leaves)} as 3-D tensors "
        f"({named[0]}: one per expert), not nn.Linear layers, so target_modules cannot select them "
        "(all-linear takes the attention projections and leaves the experts frozen)"
    )


def _llama_adapter_key_norm(method: Any, model: PreTrainedModel) -> str | None:
    if method.name not in LLAMA_ADAPTERS:
        return None
    from litpeft.methods.layout import attention_modules, head_dim  # layout -> base -> this module

    for module in attention_modules(model):
        norm = getattr(module, "k_norm", None)
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.shape[-1] != head_dim(module):
            return (
                f"{method.name}: {type(model).__name__} normalizes the keys of all heads together "
                f"(k_norm over {weight.shape[-1]} features, not per head of {head_dim(module)}), so the "
                "adaption prompts' keys cannot be computed per head as LLaMA-Adapter does"
            )
    return None


RULES: list[Callable[[Any, PreTrainedModel], str | None]] = [
    _expert_targets,
    _llama_adapter_key_norm,
]


def family_refusal(method: Any, model: PreTrainedModel) -> str | None:
    """``None`` when ``method`` can work on ``model``'s family, else why not, in one line."""
    for rule in RULES:
        reason = rule(method, model)
        if reason is not None:
            return reason
    return None


def check_family(method: Any, model: PreTrainedModel) -> None:
    """Raise :class:`LitPeftError` with :func:`family_refusal`'s reason, if any."""
    reason = family_refusal(method, model)
    if reason is not None:
        raise LitPeftError(reason)
