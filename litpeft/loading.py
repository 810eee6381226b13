"""Read the frozen base straight in the dtype each tensor is kept in: no fp32 copy of a bf16 weight.

Under ``bf16-mixed`` (litpeft's default) the frozen linear weights are held in bf16 and everything else
of the base (embeddings, norms, trainable tensors, layers a method reads in fp32) in fp32
(:func:`litpeft.precision.store_frozen_linears`). Loading the whole base in fp32 first and casting
afterwards peaked at about 2.8x the bf16 model (20.0 against 7.1 GB for a 3.6B Llama). Instead
:func:`storage_dtypes` works out, before any weight is read, which checkpoint tensors end up in a
16-bit dtype, and :func:`litpeft.models.load_model` reads those in it, cast tensor by tensor as
transformers reads the checkpoint; the rest is read in fp32.

The plan comes from a dry run on the meta device (no memory, no disk read): the base is quantized and
the method applied exactly as for the real build, and the layers that would be stored in 16 bits are
named by their place in the checkpoint. The model is bit-identical to loading in fp32 and casting: a
checkpoint tensor cast once to bf16 is the same whether it passed through fp32 or not, and fp32 tensors
are read as before. Layers that :func:`litpeft.quantize.quantize_model` replaces are read in the
checkpoint's own dtype when that is 16-bit (their quantization sees the same values; bitsandbytes'
kernels give the same codes and absmaxes from bf16/fp16 as from their fp32 upcast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from litpeft.methods.base import PeftMethod
from litpeft.precision import frozen_linears
from litpeft.quantize import QuantMode, quantize_model, quantize_targets

#: Checkpoint dtypes from which a quantized layer is read without the fp32 upcast.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def storage_dtypes(
    build_meta: Callable[[], PreTrainedModel],
    method: PeftMethod,
    quantize: QuantMode | None,
    autocast: torch.dtype | None,
    checkpoint: torch.dtype,
) -> dict[str, torch.dtype]:
    """Parameter names of the base (as ``model.state_dict()`` names them) mapped to the 16-bit dtype to
    read them in; the others are read in fp32.

    ``build_meta`` builds the fp32 base on the meta device; ``autocast`` is the ``*-mixed`` dtype (None
    otherwise); ``checkpoint`` the dtype the checkpoint is stored in (:func:`litpeft.models.checkpoint_dtype`).
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_meta()
        names = {id(m): (name, m) for name, m in model.named_modules()}  # the tuple keeps ``m`` alive
        dtypes: dict[str, torch.dtype] = {}
        if quantize:
            quantized = quantize_targets(model)
            if checkpoint in HALF_DTYPES:
                dtypes.update({f"{name}.weight": checkpoint for name in quantized})
            quantize_model(model, quantize)
        if autocast is None:
            return dtypes
        method.apply(model)
        tied = model.get_input_embeddings().weight
        for layer in frozen_linears(model, autocast):
            if id(layer) not in names:  # added by the method: not in the checkpoint
                continue
            name = names[id(layer)][0]
            if layer.weight is not tied:  # a tied head shares the fp32 table; it gets its own copy later
                dtypes[f"{name}.weight"] = autocast
            if layer.bias is not None and not layer.bias.requires_grad:
                dtypes[f"{name}.bias"] = autocast
    return dtypes
