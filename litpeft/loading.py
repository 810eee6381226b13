"""Read the frozen base straight in the dtype each tensor is kept in: no fp32 copy of a 16-bit weight.

Under ``bf16-mixed`` (litpeft's default) the frozen linear weights are held in bf16
(:func:`litpeft.precision.store_frozen_linears`), the frozen embeddings of a 16-bit checkpoint in the
checkpoint's dtype (:func:`litpeft.precision.store_frozen_embeddings`: their output is upcast to the
fp32 residual stream, exactly) and everything else of the base (norms, trainable tensors, layers a
method reads in fp32) in fp32. Loading the whole base in fp32 first and casting afterwards peaked at
about 2.8x the bf16 model (20.0 against 7.1 GB for a 3.6B Llama). Instead :func:`storage_dtypes` works
out, before any weight is read, which checkpoint tensors end up in a 16-bit dtype, and
:func:`litpeft.models.load_model` reads those in it, cast tensor by tensor as transformers reads the
checkpoint; the rest is read in fp32.

The plan comes from a dry run on the meta device (no memory, no disk read): the base is quantized and
the method applied exactly as for the real build, and the layers that would be stored in 16 bits are
named by their place in the checkpoint. The model is bit-identical to loading in fp32 and casting: a
checkpoint tensor cast once to bf16 is the same whether it passed through fp32 or not, a 16-bit value
upcast to fp32 is exact, and fp32 tensors are read as before. Layers that
:func:`litpeft.quantize.quantize_model` replaces are read in the checkpoint's own dtype when that is
16-bit (their quantization sees the same values; bitsandbytes' kernels give the same codes and
absmaxes from bf16/fp16 as from their fp32 upcast).

The embeddings stay fp32 when the method, applied to the dry run with 16-bit embeddings, creates a
trainable tensor that is not fp32: such a method takes its dtype from the embedding table, and under
``*-mixed`` the trainable tensors are fp32 master weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from litpeft.methods.base import PeftMethod
from litpeft.precision import HALF_DTYPES, frozen_embeddings, frozen_linears
from litpeft.quantize import QuantMode, quantize_model, quantize_targets, quantized_mode


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
        if quantize and quantized_mode(model) is None:  # else stored quantized: its packed data is read as is
            quantized = quantize_targets(model)
            if checkpoint in HALF_DTYPES:
                dtypes.update({f"{name}.weight": checkpoint for name in quantized})
            quantize_model(model, quantize)
        if autocast is None:
            return dtypes
        embeddings = [] if checkpoint not in HALF_DTYPES else frozen_embeddings(model)
        for embedding in embeddings:
            embedding.weight.data = embedding.weight.data.to(checkpoint)
        method.apply(model)
        if any(p.requires_grad and p.dtype != torch.float32 for p in model.parameters()):
            embeddings = []  # the method took its dtype from a 16-bit table: keep the tables fp32
        stored = {id(m) for m in frozen_embeddings(model)}  # still frozen after the method
        for embedding in embeddings:
            if id(embedding) in stored:
                dtypes[f"{names[id(embedding)][0]}.weight"] = checkpoint
        tied = model.get_input_embeddings().weight
        for layer in frozen_linears(model, autocast):
            if id(layer) not in names:  # added by the method: not in the checkpoint
                continue
            name = names[id(layer)][0]
            if layer.weight is not tied:  # a tied head is the table: planned above, or kept fp32
                dtypes[f"{name}.weight"] = autocast
            if layer.bias is not None and not layer.bias.requires_grad:
                dtypes[f"{name}.bias"] = autocast
    return dtypes
