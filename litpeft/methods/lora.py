"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685), with rsLoRA and DoRA switches.

A frozen linear map ``W`` gets a trainable low-rank update (paper eq. 3)::

    h = W x + (alpha / r) * B A x,      A: r x in,  B: out x r,  B = 0 at init

so the wrapped model starts exactly at the base model. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)
scales by ``alpha / sqrt(r)`` instead. DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5) splits the
adapted weight into a trainable magnitude ``m`` and a direction::

    W' = m * (W + s B A) / ||W + s B A||_c        (||.||_c: norm of each output row, detached)

With dropout, DoRA trains peft's function: the dropped input feeds the magnitude term too,
``W x + (m/||.||_c - 1) W drop(x) + m/||.||_c s B A drop(x)`` (in eval mode: ``W' x``).
:meth:`LoRALinear.merge` / :meth:`LoRALinear.unmerge` fold the update into the base weight in place and
back; :meth:`LoRA.merge` (``litpeft merge``) uses it.

``init`` also takes PiSSA, OLoRA and LoftQ, which start ``A``, ``B`` from the base weight and rewrite the
base (:mod:`litpeft.methods.lora_init`). QLoRA (Dettmers et al. 2023) is this method on a quantized base (``model.quantize``). Layers hold
``lora_A`` / ``lora_B`` as ``nn.Linear`` and the wrapped layer as ``base_layer``, so parameter names
are Hugging Face peft's and export is a rename of the prefix only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods import lora_init
from litpeft.methods.base import (
    Dropout,
    PeftLayer,
    PeftMethod,
    _is_int,
    check_arg,
    check_target_modules,
    find_targets,
    refuse,
    replace_module,
)
from litpeft.quantize import plain_layer
from litpeft.speedups import SPEEDUPS


class LoRALinear(nn.Module, PeftLayer):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` around an ``nn.Linear`` or GPT-2 ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
        loftq_iter: int = 1,
        saved: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Conv1D stores its weight as (in, out) and computes x @ W (peft's fan_in_fan_out).
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        out_features, in_features = self._base_weight().shape
        w = base_layer.weight
        # fp32 whatever the base's dtype (master weights; the forward casts at the edges)
        f = {"device": w.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(in_features, r, bias=False, **f)
        self.lora_B = nn.Linear(r, out_features, bias=False, **f)
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        #: ``(P, Q)``: the base is the original weight minus ``P Q`` (see lora_init); None: the original
        self.base_offset: tuple[torch.Tensor, torch.Tensor] | None = None
        if lora_init.rewrites_base(init):
            lora_init.initialise(self, init, loftq_iter, saved)
        else:
            self.reset_lora_parameters(init)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:  # ||W + s B A||: the base's norms when B = 0 (peft's DoRA init)
            self.lora_magnitude_vector = nn.Parameter(
                self._column_norm(self._base_weight().float() + self.delta_weight()).to(w.device)
            )

    def fp32_base_layers(self) -> list[nn.Module]:
        return [self.base_layer] if self.lora_magnitude_vector is not None else []

    def _base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        w = (
            w.dequantize()
            if hasattr(w, "dequantize") and w.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            else w
        )
        return w.T if self.fan_in_fan_out else w

    @staticmethod
    def _column_norm(weight: torch.Tensor) -> torch.Tensor:
        return weight.norm(p=2, dim=1)

    def reset_lora_parameters(self, init: str) -> None:
        if init == "kaiming":  # peft's and the reference implementation's default
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            raise ValueError(f"unknown LoRA init '{init}' (kaiming, gaussian)")
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in the base weight's (out, in) layout."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.disabled:
            self.unmerge()  # the base model was asked for (peft does the same)
        if self.disabled or self.merged:
            return self.base_layer(x)
        a = self.lora_A.weight
        if not SPEEDUPS.lora_forward and self.lora_magnitude_vector is None:
            # The form before the speed change (``SPEEDUPS.lora_forward`` off, for the benchmark's ablation).
            result = self.base_layer(x)
            lora = self.lora_B(self.lora_A(self.lora_dropout(x).to(a.dtype))) * self.scaling
            return result + lora.to(result.dtype)
        if type(self.base_layer) in (nn.Linear, Conv1D) and torch.is_autocast_enabled(x.device.type):
            # One cast of the input, shared by the base layer and the LoRA branch (autocast would cast
            # it for each of them, and an fp32 LoRA weight would first pull a bf16 input back to fp32).
            x = x.to(torch.get_autocast_dtype(x.device.type))
            result, dropped = self.base_layer(x), self.lora_dropout(x)
            h = self.lora_A(dropped)
        else:
            result, dropped = self.base_layer(x), self.lora_dropout(x)
            h = self.lora_A(dropped.to(a.dtype))
        # Scaling the rank-r activations, not the output, is the same product at a fraction of the cost.
        lora = self.lora_B(h * self.scaling)
        if self.lora_magnitude_vector is None:
            return result + lora.to(result.dtype)
        # DoRA: m/||W + sBA|| rescales the base output (bias excluded) and the LoRA branch alike.
        weight = self._base_weight().to(a.dtype) + self.delta_weight()
        scale = (self.lora_magnitude_vector / self._column_norm(weight).detach()).to(result.dtype)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # With dropout, the magnitude term sees the dropped input as the LoRA branch does, as in
            # peft's DoRA: W x + (scale - 1) W drop(x) + scale s B A drop(x).
            base_weight = self._base_weight()
            base_out = F.linear(dropped.to(base_weight.dtype), base_weight).to(result.dtype)
        else:
            bias = self.base_layer.bias
            base_out = result - bias if bias is not None else result
        return result + (scale - 1) * base_out + scale * lora.to(result.dtype)

    def _merged_out_in(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + s B A`` in fp32, (out, in), and DoRA's row factor ``m / ||W + s B A||`` (else None)."""
        weight = self._base_weight().float() + self.delta_weight().float()
        if self.lora_magnitude_vector is None:
            return weight, None
        return weight, self.lora_magnitude_vector.float() / self._column_norm(weight)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, in the base layer's own layout and dtype."""
        base = self._base_weight()
        weight, factor = self._merged_out_in()
        if factor is not None:
            weight = weight * factor[:, None]
        weight = weight.T if self.fan_in_fan_out else weight
        return weight.to(base.dtype if base.is_floating_point() else torch.float32)

    def can_merge_in_place(self) -> bool:
        """Whether :meth:`merge` can write into the base weight: a float ``nn.Linear`` or ``Conv1D``."""
        return type(self.base_layer) in (nn.Linear, Conv1D) and self.base_layer.weight.is_floating_point()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer``'s weight in place; the layer then computes as the base
        layer alone (one matmul) until :meth:`unmerge`. A quantized base cannot take the merged weight:
        :meth:`LoRA.merge` replaces such a layer by a plain one."""
        if self.merged:
            return
        if not self.can_merge_in_place():
            raise LitPeftError(
                f"LoRA merges in place into a float nn.Linear or Conv1D only, not {type(self.base_layer).__name__} "
                f"with {self.base_layer.weight.dtype} weights; use LoRA.merge(model)"
            )
        weight, factor = self._merged_out_in()
        if factor is not None:
            weight = weight * factor[:, None]
            self._dora_factor = factor  # unmerge divides by it (m may change while merged)
        self.base_layer.weight.copy_(weight.T if self.fan_in_fan_out else weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base weight back (up to rounding in its dtype), the adapter separate."""
        if not self.merged:
            return
        weight = self._base_weight().float()
        if self.lora_magnitude_vector is not None:
            weight = weight / self._dora_factor[:, None]
            del self._dora_factor
        weight = weight - self.delta_weight().float()
        self.base_layer.weight.copy_(weight.T if self.fan_in_fan_out else weight)
        self.merged = False


class LoRA(PeftMethod):
    """LoRA on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``).

    Args:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the LoRA branch input.
        target_modules: layer names (suffix match), a regex (full match), or ``"all-linear"`` (every linear
            layer except the LM head). One string is a regex, as in peft; a plain name that matches no
            full name (``q_proj``) is taken as that one name (see :func:`~litpeft.methods.base.find_targets`).
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA (DoRA): adds a trainable magnitude per output feature.
        init: ``kaiming`` (uniform, as peft) or ``gaussian`` (std 1/r) for A, B = 0; or from the base weight
            (:mod:`~litpeft.methods.lora_init`, as peft's ``init_lora_weights``): ``pissa`` (top-r SVD),
            ``pissa_niter_K`` (randomized SVD, K iterations), ``olora`` (QR), ``loftq`` (nf4 + SVD of the
            residual; quantizes the adapted layers itself). These rewrite the base weight; the adapter
            stores what rebuilds it from the original one.
        loftq_iter: LoftQ's alternating quantization/SVD steps (peft's ``LoftQConfig.loftq_iter``).
        bias: ``none``, ``lora_only`` (train the biases of adapted layers) or ``all`` (every bias).
    """

    name = "lora"
    learning_rate = 2e-4  # configs/lora.yaml
    mergeable = True
    exportable_to_peft = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
        bias: Literal["none", "lora_only", "all"] = "none",
        loftq_iter: int = 1,
    ) -> None:
        check_arg(_is_int(r) and r > 0, "r", r, "LoRA's rank must be a positive integer")
        check_arg(
            alpha > 0, "alpha", alpha, "LoRA's alpha must be positive (the update is scaled by alpha / r)"
        )
        check_arg(0 <= dropout < 1, "dropout", dropout, "a dropout probability is in [0, 1)")
        check_target_modules(target_modules)
        check_arg(
            isinstance(init, str) and lora_init.valid_init(init),
            "init",
            init,
            "one of: kaiming, gaussian, pissa, pissa_niter_K (K iterations, e.g. pissa_niter_4), olora, loftq",
        )
        check_arg(_is_int(loftq_iter) and loftq_iter > 0, "loftq_iter", loftq_iter, "a positive integer")
        check_arg(bias in ("none", "lora_only", "all"), "bias", bias, "one of: none, lora_only, all")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = (
            list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        )
        self.use_rslora, self.use_dora, self.init, self.bias = use_rslora, use_dora, init, bias
        self.loftq_iter = loftq_iter
        self._saved: dict[str, torch.Tensor] | None = None

    def peft_refusal(self) -> str | None:
        if self.init == "loftq":
            return (
                "init 'loftq' rewrites the base as nf4 codes that no LoRA on the original base expresses; "
                "use the litpeft adapter (or litpeft merge), which rebuilds that base"
            )
        return super().peft_refusal()

    def apply(self, model: PreTrainedModel, saved: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
        self._saved = saved
        try:
            return super().apply(model)
        finally:
            self._saved = None

    def inject(self, model: PreTrainedModel) -> None:
        names = find_targets(model, self.target_modules, (nn.Linear, Conv1D))
        if lora_init.rewrites_base(self.init):
            for name in names:
                refuse(lora_init.refusal(self.init, model.get_submodule(name), self.r, name))
        for name in names:
            base = model.get_submodule(name)
            saved = None
            if self._saved is not None and lora_init.rewrites_base(self.init):
                saved = lora_init.layer_offsets(self._saved, name)
            layer = LoRALinear(
                base,
                self.r,
                self.alpha,
                self.dropout,
                self.use_rslora,
                self.use_dora,
                self.init,
                self.loftq_iter,
                saved,
            )
            if self.bias == "lora_only" and base.bias is not None:
                base.bias.requires_grad_(True)
            replace_module(model, name, layer)
        if self.bias == "all":
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.requires_grad_(True)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors and, for an init that rewrote the base, each layer's base offset."""
        return {**super().adapter_state_dict(model), **lora_init.offsets(model)}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        held = lora_init.offsets(model)  # read from ``state`` at apply (or computed, when not loading)
        differ = [k for k, v in held.items() if k in state and not torch.equal(state[k].to(v.device), v)]
        if differ:
            raise LitPeftError(
                f"the adapter's base offsets ({differ[0]}, ...) differ from the ones this model's base was "
                f"rewritten with by init '{self.init}' (another base, or recomputed on other hardware)"
            )
        super().load_adapter_state_dict(model, state)

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Fold ``s B A`` (and DoRA's magnitude) into each base weight and remove the LoRA layers."""
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                base = module.base_layer
                if module.can_merge_in_place():
                    module.merge()
                else:  # a subclass (e.g. litpeft.quantize.QuantizedLinear) is replaced by a plain layer
                    weight = module.merged_weight()
                    out_in = weight.T if module.fan_in_fan_out else weight
                    base = plain_layer(base, out_in, getattr(base, "bias", None))
                replace_module(model, name, base)
        model.requires_grad_(False)
        return model

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # peft matches target names by suffix: the short names when they select exactly the adapted
        # layers (the usual case), the full names when they would select more (a regex or a subset).
        adapted = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
        short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
        same_named = {
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, LoRALinear))
            and not n.endswith((".base_layer", ".lora_A", ".lora_B"))
            and n.rsplit(".", 1)[-1] in short
        }
        targets = short if same_named == set(adapted) else adapted
        r, alpha = self.r, self.alpha
        if any(lora_init.is_offset(k) for k in state):  # a plain LoRA of rank 2r on the original base
            layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
            state = lora_init.as_plain_lora(state, layer.scaling)
            r, alpha = 2 * self.r, self.alpha * (math.sqrt(2) if self.use_rslora else 2)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "bias": self.bias,
            "fan_in_fan_out": isinstance(
                model.get_submodule(
                    next(k for k in state if ".lora_A" in k).rsplit(".lora_A", 1)[0] + ".base_layer"
                ),
                Conv1D,
            ),
            "init_lora_weights": True,
            "inference_mode": True,
        }
        tensors = {}
        for k, v in state.items():
            # Biases keep their names: peft also saves a wrapped layer's bias as ``<layer>.base_layer.bias``.
            # DoRA's magnitude too: ``<layer>.lora_magnitude_vector``, the key peft's own
            # ``get_peft_model_state_dict`` writes (its module's ``.weight`` suffix dropped).
            tensors["base_model.model." + k] = v
        return config, tensors


def loraplus_param_groups(model: nn.Module, lr_ratio: float) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024, arXiv 2402.12354, sec. 3: ``eta_B = lambda * eta_A``): two groups of the
    trainable tensors, ``B`` with ``lr_ratio`` (the optimizer's LR is multiplied by it) and ``A`` without.

    As the authors' code (and peft's ``create_loraplus_optimizer``), the 1-D tensors (DoRA's magnitude,
    trained biases) go with ``B``. Any LoRA variant qualifies: it has ``lora_B`` layers.
    """
    a, b = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if ".lora_B." in name or p.ndim == 1 else a).append(p)
    if not b:
        raise LitPeftError("loraplus_lr_ratio: the model has no LoRA B matrices to give the larger LR")
    return [g for g in ({"params": a}, {"params": b, "lr_ratio": lr_ratio}) if g["params"]]
