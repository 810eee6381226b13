"""What a Lightning precision setting means for a frozen base plus a trainable adapter.

- ``bf16-true``/``16-true``: the base is loaded in that dtype; the adapter keeps fp32 master weights
  (``PeftLM._apply`` keeps Lightning's plugin from casting them down).
- ``bf16-mixed``/``16-mixed``: autocast runs the matmuls in the low dtype; the frozen linear weights are
  stored in that dtype (:func:`store_frozen_linears`), read straight in it from the checkpoint
  (:mod:`litpeft.loading`); frozen embeddings of a 16-bit checkpoint keep its dtype and hand the fp32
  residual stream exact fp32 values (:func:`store_frozen_embeddings`); the rest of the base is fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from litpeft.methods.base import PeftLayer
from litpeft.speedups import SPEEDUPS

log = logging.getLogger(__name__)

BASE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)
#: The residual stream's dtype under ``*-mixed``: what a 16-bit embedding's output is upcast to.
RESIDUAL_DTYPE = torch.float32
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def base_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base is loaded in: the ``*-true`` dtype, else fp32."""
    return BASE_DTYPES.get(str(precision), torch.float32)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``*-mixed`` precision, else ``None``."""
    return AUTOCAST_DTYPES.get(str(precision))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Tensors created inside the block default to ``dtype`` (the adapter's fp32 whatever the base's)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> list[torch.nn.Module]:
    """The layers :func:`store_frozen_linears` holds in ``dtype``: frozen plain ``nn.Linear``/``Conv1D``
    layers not read in fp32 by a PEFT layer, in fp32 or already loaded in ``dtype``, not stored yet."""
    keep_fp32 = {
        id(m) for layer in model.modules() if isinstance(layer, PeftLayer) for m in layer.fp32_base_layers()
    }
    return [
        module
        for module in model.modules()
        if type(module) in (torch.nn.Linear, Conv1D)
        and id(module) not in keep_fp32
        and not module.weight.requires_grad
        and module.weight.dtype in (torch.float32, dtype)
        and not getattr(module, "_litpeft_stored", False)
    ]


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Hold the frozen ``nn.Linear``/``Conv1D`` weights and biases in ``dtype``; return how many layers.

    Under ``*-mixed`` autocast runs every linear layer in ``dtype`` and casts a frozen weight on every use
    (its cast cache keeps only trainable leaves), so storing them cast once gives bit-identical results
    with half the memory and none of the per-step casts. A frozen head tied to the embeddings gets its
    own ``dtype`` copy when the table is fp32 (autocast would otherwise cast the whole vocabulary matrix
    twice a step: the model's own empty head call, then litpeft's at the loss positions; the copy costs no
    more than the cast that autocast keeps for the backward; it is a buffer, not a parameter), and shares the table when that is already
    in ``dtype`` (:func:`store_frozen_embeddings`). Norms, all trainable tensors and the layers a PEFT
    layer reads in fp32 (:meth:`PeftLayer.fp32_base_layers`) keep fp32. Outside autocast, hooks run such
    a layer in ``dtype`` and return its output in the input's dtype, so the model still runs as before
    (e.g. called directly after ``fit``). Weights already loaded in ``dtype``
    (:func:`litpeft.loading.storage_dtypes`) are kept as they are and get the same hooks.
    """
    if not SPEEDUPS.frozen_bf16:
        return 0
    tied = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    layers = frozen_linears(model, dtype)
    for module in layers:
        weight = module.weight
        if weight is tied and weight.dtype != dtype:
            # a cast cache, not a parameter: no second count of the table (the model summary's "167 M"
            # for a 135M model); a buffer still moves with the model and is in the state dict as before
            del module.weight
            module.register_buffer("weight", weight.detach().to(dtype))
        else:
            module.weight.data = weight.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
        module._litpeft_stored = True
        module.register_forward_pre_hook(_outside_autocast_in)
        module.register_forward_hook(_outside_autocast_out)
    return len(layers)


def cast_copies_out_of_ddp(root: torch.nn.Module) -> None:
    """DDP broadcasts every buffer from rank 0 at each forward: not the head's cast copy (a constant that
    each rank makes from its own table, :func:`store_frozen_linears`), as when it was a frozen parameter."""
    names = {
        f"{n}.weight"
        for n, m in root.named_modules()
        if getattr(m, "_litpeft_stored", False) and "weight" in m._buffers
    }
    if names:
        root._ddp_params_and_buffers_to_ignore = sorted(
            {*getattr(root, "_ddp_params_and_buffers_to_ignore", ()), *names}
        )


def store_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Under ``*-mixed`` (autocast ``dtype``): :func:`store_frozen_embeddings`, then
    :func:`store_frozen_linears` (a tied head then shares a table already in ``dtype``)."""
    store_frozen_embeddings(model)
    store_frozen_linears(model, dtype)


def _outside_autocast_in(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Outside autocast: cast the input to the stored weight's dtype (and remember its own dtype)."""
    x = args[0]
    module._litpeft_input_dtype = None
    if torch.is_autocast_enabled(x.device.type) or x.dtype == module.weight.dtype:
        return None
    module._litpeft_input_dtype = x.dtype
    return (x.to(module.weight.dtype), *args[1:])


def _outside_autocast_out(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    """...and give the output back in the input's dtype, as the fp32 layer would."""
    dtype = module._litpeft_input_dtype
    return None if dtype is None else output.to(dtype)


def frozen_embeddings(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """Frozen embeddings whose lookup :func:`store_frozen_embeddings` can keep in 16 bits exactly: plain
    ``nn.Embedding`` lookups and the scaled word embeddings (``lookup * embed_scale``: Gemma, BioGPT, ...)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding)
        and not m.weight.requires_grad
        and (type(m).forward is torch.nn.Embedding.forward or _scaled(m))
    ]


def _scaled(module: torch.nn.Embedding) -> bool:
    return type(module).__name__.endswith("ScaledWordEmbedding") and hasattr(module, "embed_scale")


def store_frozen_embeddings(model: torch.nn.Module) -> int:
    """Keep frozen 16-bit embedding tables (read in the checkpoint's dtype, :mod:`litpeft.loading`) in
    16 bits and upcast their output to the fp32 residual stream; return how many.

    The checkpoint holds 16-bit values, so an fp32 table built from it holds the same values at twice
    the memory (1.6 GB instead of 0.8 for Llama 3's 128256 x 3072): the lookup followed by the exact
    upcast gives bit-identical activations. A scaled embedding multiplies after the upcast, in fp32
    (``lookup * embed_scale``, as it does with an fp32 table; its own forward would round the scale and
    the product to 16 bits). Each table is checked on its first rows against its own forward on an fp32
    copy of them; one that disagrees (a subclass computing something else) is upcast to fp32 instead.
    fp32 tables (fp32 checkpoints, ``tiny:`` models) are left alone.
    """
    stored = 0
    for module in frozen_embeddings(model):
        if module.weight.dtype not in HALF_DTYPES or getattr(module, "_litpeft_stored", False):
            continue
        if not module.weight.is_meta and not _exact(module):
            log.warning("%s computes more than a lookup: its table is kept in fp32", type(module).__name__)
            module.weight.data = module.weight.data.to(RESIDUAL_DTYPE)
            continue
        module.register_forward_hook(_upcast, with_kwargs=True)
        module._litpeft_stored = True
        stored += 1
    return stored


def _fp32_lookup(module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """What the module computes with an fp32 table holding the same values."""
    out = torch.nn.Embedding.forward(module, ids).to(RESIDUAL_DTYPE)
    if _scaled(module):
        scale = module.embed_scale
        out = out * (scale.to(RESIDUAL_DTYPE) if isinstance(scale, torch.Tensor) else scale)
    return out


def _upcast(
    module: torch.nn.Embedding, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
) -> torch.Tensor:
    if not _scaled(module):
        return output.to(RESIDUAL_DTYPE)
    return _fp32_lookup(module, args[0] if args else next(iter(kwargs.values())))


def _exact(module: torch.nn.Embedding) -> bool:
    """Does :func:`_fp32_lookup` equal the module's own forward with an fp32 copy of its first rows?"""
    rows = min(8, module.num_embeddings)
    probe = torch.nn.Embedding.__new__(type(module))
    probe.__dict__.update(module.__dict__)
    probe._parameters = {"weight": torch.nn.Parameter(module.weight[:rows].detach().to(RESIDUAL_DTYPE))}
    probe._forward_hooks, probe._forward_pre_hooks = {}, {}
    probe.padding_idx = None
    ids = torch.arange(rows, device=module.weight.device)
    with torch.no_grad():
        return torch.equal(type(module).forward(probe, ids), _fp32_lookup(module, ids))
