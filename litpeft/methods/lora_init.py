"""LoRA's initialisations from the base weight (PiSSA, OLoRA, LoftQ): each starts ``A``, ``B`` from a
decomposition of ``W`` and rewrites the frozen base so that step 0 is (about) the base model.

    pissa         A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s) (top-r SVD, Meng et al. 2024, arXiv 2404.02948,
                  sec. 3); base W_res = W - s B A. ``pissa_niter_K``: torch's randomized SVD with K subspace
                  iterations (Halko et al. 2011), as peft.
    olora         W = Q R (QR); B = Q[:, :r], A = R[:r] (Buyukakyuz 2024, arXiv 2406.01775, sec. 3); W_res = W - s B A.
    loftq         alternating ``Q_t = nf4(W - L_{t-1} R_{t-1})`` and ``L_t R_t = SVD_r(W - Q_t)``, ``loftq_iter`` times
                  (Li et al. 2023, arXiv 2310.08659, Algorithm 1); B = L_T, A = R_T, and the base *is* the
                  nf4-quantized ``Q_T`` (a :class:`~litpeft.quantize.QuantizedLinear`). As in peft, the factors
                  carry no ``alpha / r``: step 0 is ``Q_T + s L_T R_T``, the base model only when ``s = 1``.

Each gives the same ``A``, ``B`` and base weight as peft 0.21.2's ``init_lora_weights`` of the same name
(tests/methods/test_lora_init.py). The rewritten base is not the hub's, so an adapter alone would not
reproduce the trained model. Each rewritten layer therefore keeps the *base offset* that turns the
original weight into its base, ``W_base = W - P Q`` (``P = s B_0``, ``Q = A_0`` for PiSSA/OLoRA; LoftQ's
``L_{T-1}``, ``R_{T-1}``, quantized after the subtraction; none for ``loftq_iter: 1``). The adapter
directory stores it (``<layer>.base_offset_P/Q``), and loading rebuilds the base from the original
weight and the stored offset with the same operations (no decomposition at load). Exported to peft,
PiSSA/OLoRA become a plain rank-2r LoRA on the original weight, ``[B, -P/s] [A; Q]`` (peft's
``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from litpeft.quantize import QuantizedLinear, plain_layer

if TYPE_CHECKING:
    from litpeft.methods.lora import LoRALinear

PLAIN_INITS = ("kaiming", "gaussian")
BASE_INITS = ("pissa", "pissa_niter_K", "olora", "loftq")
OFFSET_P, OFFSET_Q = "base_offset_P", "base_offset_Q"
#: pissa_niter_K draws the randomized SVD's test matrix from this seed in every layer (outside torch's
#: global stream): a resumed run rebuilds the same base.
NITER_SEED = 0


def valid_init(init: str) -> bool:
    return init in PLAIN_INITS or init in ("pissa", "olora", "loftq") or _niter(init) is not None


def rewrites_base(init: str) -> bool:
    return init not in PLAIN_INITS


def _niter(init: str) -> int | None:
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    return int(match.group(1)) if match else None


def refusal(init: str, layer: nn.Module, r: int, name: str = "") -> str | None:
    """Why ``init`` cannot start a LoRA of rank ``r`` on the base ``layer``, in one line (else None)."""
    where = f" ({name})" if name else ""
    if isinstance(layer, QuantizedLinear) or not layer.weight.is_floating_point():
        return (
            f"LoRA init '{init}' decomposes the float base weight, but the layer{where} is already quantized: "
            + (
                "leave model.quantize null (LoftQ quantizes the adapted layers to nf4 itself)"
                if init == "loftq"
                else "initialise on a float base (model.quantize null), as peft requires"
            )
        )
    if init in ("olora", "loftq") and isinstance(layer, Conv1D):
        return f"LoRA init '{init}' does not work on GPT-2's Conv1D layers{where} (peft decomposes them untransposed)"
    out_features, in_features = (layer.weight.T if isinstance(layer, Conv1D) else layer.weight).shape
    if r > min(out_features, in_features):
        return f"LoRA init '{init}' needs r <= {min(out_features, in_features)} (the smaller side of {name or 'a layer'})"
    return None


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """``(A, B)`` of PiSSA from the fp32 ``(out, in)`` weight (full SVD, or randomized with ``niter``)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(NITER_SEED)
            u, s, v = torch.svd_lowrank(weight, r, niter=niter)
        vh = v.t()
    root = torch.diag(torch.sqrt(s / scaling))
    return root @ vh, u @ root


@torch.no_grad()
def olora(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, ...]:
    """``(A, B)`` of OLoRA: ``R[:r]`` and ``Q[:, :r]`` of the QR decomposition of the fp32 ``(out, in)`` weight."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _top_r(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``: the best rank-r factors of ``matrix``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vh[:r]


def nf4(weight: torch.Tensor, layer: nn.Module) -> QuantizedLinear:
    """``layer`` (its bias) with the fp32 ``(out, in)`` ``weight`` quantized to nf4 (blocks of 64, as peft's LoftQ)."""
    return QuantizedLinear.from_float(plain_layer(layer, weight, getattr(layer, "bias", None)), "nf4")


@torch.no_grad()
def loftq(
    weight: torch.Tensor, layer: nn.Module, r: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor, QuantizedLinear, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(A, B, quantized base, offset)`` of LoftQ from the fp32 ``(out, in)`` weight; ``offset`` is
    ``(L_{T-1}, R_{T-1})``, whose product was subtracted before the last quantization (None when ``T = 1``)."""
    residual, offset = weight, None
    for t in range(iters):
        quantized = nf4(residual, layer)
        left, right = _top_r(weight - quantized.dequantize(torch.float32), r)
        if t + 1 < iters:
            offset = (left, right)
            residual = weight - left @ right
    return right, left, quantized, offset


@torch.no_grad()
def initialise(layer: LoRALinear, init: str, loftq_iter: int, saved: dict[str, torch.Tensor] | None) -> None:
    """Start ``layer``'s ``A``, ``B`` with ``init`` and rewrite its base (see the module docstring).

    ``saved``: the layer's stored base offset (``OFFSET_P``/``OFFSET_Q``; empty for ``loftq_iter: 1``) when an
    adapter is being loaded: the base is rebuilt from it and ``A``, ``B`` are left for the loaded tensors.
    """
    base = layer.base_layer
    if base.weight.is_meta:  # a meta model (planning what to read in which dtype): nothing to compute
        if init == "loftq":
            layer.base_layer = nf4(layer._base_weight(), base)
        return
    weight = layer._base_weight().float()
    a = b = offset = None
    if saved is not None:
        offset = (saved[OFFSET_P], saved[OFFSET_Q]) if OFFSET_P in saved else None
        offset = tuple(t.to(weight.device, torch.float32) for t in offset) if offset else None
    elif init == "loftq":
        a, b, quantized, offset = loftq(weight, base, layer.lora_A.out_features, loftq_iter)
    elif init == "olora":
        a, b = olora(weight, layer.lora_A.out_features)
    else:
        a, b = pissa(weight, layer.lora_A.out_features, layer.scaling, _niter(init))
    if init != "loftq" and offset is None:
        offset = (layer.scaling * b, a)  # peft subtracts ``scaling * B @ A`` in this order
    if init == "loftq":
        if saved is not None:
            quantized = nf4(weight - offset[0] @ offset[1] if offset else weight, base)
        layer.base_layer = quantized
    else:
        new = weight - offset[0] @ offset[1]
        new = (new.T if layer.fan_in_fan_out else new).to(base.weight.dtype).contiguous()
        # a new Parameter, not a write into the old one: a base shared with other models (litpeft serve)
        # stays as it is
        base.weight = nn.Parameter(new, requires_grad=False)
    if a is not None:
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
    layer.base_offset = offset


def offsets(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<layer>.base_offset_P/Q`` of every LoRA layer whose base was rewritten from an offset."""
    out = {}
    for name, module in model.named_modules():
        offset = getattr(module, "base_offset", None)
        if offset is not None:
            out[f"{name}.{OFFSET_P}"], out[f"{name}.{OFFSET_Q}"] = (t.detach() for t in offset)
    return out


def layer_offsets(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The stored offset of the layer ``name`` in an adapter's tensors (empty when it has none)."""
    return {k: state[f"{name}.{k}"] for k in (OFFSET_P, OFFSET_Q) if f"{name}.{k}" in state}


def is_offset(key: str) -> bool:
    return key.endswith((f".{OFFSET_P}", f".{OFFSET_Q}"))


def as_plain_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The adapter as a plain LoRA of rank 2r on the *original* weights: for each layer with an offset,
    ``A' = [A; Q]``, ``B' = [B, -P / s]``, so ``s B' A' = s B A - P Q`` (peft's ``subtract_mutated_init``).
    The other tensors (biases, DoRA's magnitudes) are kept as they are."""
    out = {k: v for k, v in state.items() if not is_offset(k)}
    for key in [k for k in state if k.endswith(f".{OFFSET_P}")]:
        layer = key[: -len(OFFSET_P) - 1]
        p, q = state[key], state[f"{layer}.{OFFSET_Q}"]
        out[f"{layer}.lora_A.weight"] = torch.cat([state[f"{layer}.lora_A.weight"], q], dim=0)
        out[f"{layer}.lora_B.weight"] = torch.cat([state[f"{layer}.lora_B.weight"], -p / scaling], dim=1)
    return out
