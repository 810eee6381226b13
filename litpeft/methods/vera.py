"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2023, arXiv 2310.11454).

One pair of frozen random matrices ``A`` (r x in) and ``B`` (out x r) is shared by every adapted layer;
each layer trains only two scaling vectors (paper eq. 1)::

    h = W x + Lambda_b B Lambda_d A x,      Lambda_b = diag(b) (b: out, 0 at init),  Lambda_d = diag(d)

so the wrapped model starts exactly at the base model (``b = 0``; ``d`` starts at ``d_initial``, 0.1).
``A`` and ``B`` are drawn (Kaiming uniform, sec. 3.2) from a generator seeded with
``projection_prng_key``, as large as the largest adapted layer; a layer uses their top-left corner. They
are rebuilt from the key and never saved with the adapter. As in Hugging Face peft (whose draws, order
and shapes these are, so that the same key gives the same matrices), the layers hold ``vera_lambda_b`` /
``vera_lambda_d``; the peft export adds the matrices themselves (``save_projection``). A weight update:
:meth:`VeRA.merge` adds ``Lambda_b B Lambda_d A`` to each base weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

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

SLOT = "vera_projections"  # the shared A and B, hung on the model (non-persistent buffers)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming uniform (fan in, gain sqrt(2)) drawn from ``generator``: peft's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen ``vera_A`` (r x max in) and ``vera_B`` (max out x r)."""

    def __init__(self, r: int, max_in: int, max_out: int, key: int, device: torch.device) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(key)
        a = kaiming_uniform((r, max_in), g)  # A first, then B: peft's order
        b = kaiming_uniform((max_out, r), g)
        self.register_buffer("vera_A", a.to(device), persistent=False)
        self.register_buffer("vera_B", b.to(device), persistent=False)


class VeRALinear(nn.Module, DeltaWeightLayer):
    """``base_layer(x) + b * (B (d * (A dropout(x))))`` with the shared ``A``, ``B`` cut to this layer."""

    def __init__(
        self, base_layer: nn.Module, projections: VeRAProjections, r: int, d_initial: float, dropout: float
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.__dict__["projections"] = projections  # a reference, not a child: the model holds it once
        f = {"device": layer_device(base_layer), "dtype": torch.float32}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **f))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **f))
        self.vera_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def _a_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.vera_lambda_d.dtype
        a = self.projections.vera_A[:, : self.in_features].to(dtype)
        b = self.projections.vera_B[: self.out_features, :].to(dtype)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        a, b = self._a_b()
        h = F.linear(self.vera_dropout(x).to(a.dtype), a)
        return result + (self.vera_lambda_b * F.linear(self.vera_lambda_d * h, b)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``Lambda_b B Lambda_d A`` as ``(out, in)``."""
        a, b = self._a_b()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)


class VeRA(PeftMethod):
    """VeRA on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``).

    Args:
        r: rank of the shared random matrices (the paper uses hundreds to thousands: the trained vectors
            cost ``out + r`` per layer whatever ``r``).
        target_modules: layer names (suffix match), a regex (full match) or ``"all-linear"``, as LoRA's.
        d_initial: the initial value of every ``d`` (the paper's 0.1, sec. 3.2).
        projection_prng_key: the seed of ``A`` and ``B`` (the same key gives peft's matrices).
        dropout: dropout on the input of the VeRA branch.
    """

    name = "vera"
    learning_rate = 4e-3  # configs/vera.yaml
    mergeable = True
    exportable_to_peft = True

    def __init__(
        self,
        r: int = 256,
        target_modules: str | list[str] = "all-linear",
        d_initial: float = 0.1,
        projection_prng_key: int = 0,
        dropout: float = 0.0,
    ) -> None:
        check_arg(_is_int(r) and r > 0, "r", r, "VeRA's rank must be a positive integer")
        check_target_modules(target_modules)
        check_arg(0 <= dropout < 1, "dropout", dropout, "a dropout probability is in [0, 1)")
        check_arg(_is_int(projection_prng_key), "projection_prng_key", projection_prng_key, "an integer seed")
        self.r, self.d_initial, self.projection_prng_key, self.dropout = (
            r,
            d_initial,
            projection_prng_key,
            dropout,
        )
        self.target_modules = (
            list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        )

    def inject(self, model: PreTrainedModel) -> None:
        names = find_targets(model, self.target_modules, (nn.Linear, Conv1D))
        layers = [model.get_submodule(n) for n in names]
        max_in = max(in_out_features(m)[0] for m in layers)
        max_out = max(in_out_features(m)[1] for m in layers)
        device = layer_device(layers[0])
        projections = attach(
            model, SLOT, VeRAProjections(self.r, max_in, max_out, self.projection_prng_key, device)
        )
        for name, layer in zip(names, layers, strict=True):
            replace_module(model, name, VeRALinear(layer, projections, self.r, self.d_initial, self.dropout))

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Add each layer's ``Lambda_b B Lambda_d A`` to its weight; remove the VeRA layers and matrices."""
        merge_layers(model, VeRALinear)
        detach(model, SLOT)
        return model

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}
        adapted = sorted(k.rsplit(".vera_lambda_b", 1)[0] for k in state if k.endswith(".vera_lambda_b"))
        config = {
            "peft_type": "VERA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "target_modules": peft_target_names(model, adapted),
            "projection_prng_key": self.projection_prng_key,
            "save_projection": True,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": isinstance(layers[adapted[0]].base_layer, Conv1D),
            "init_weights": True,
            "inference_mode": True,
        }
        projections = attached(model, SLOT)
        tensors = {"base_model.model." + k: v for k, v in state.items()}
        tensors["base_model.vera_A"] = projections.vera_A.float()
        tensors["base_model.vera_B"] = projections.vera_B.float()
        return config, tensors
