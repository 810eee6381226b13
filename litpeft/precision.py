"""What a Lightning precision setting means for a frozen base plus a trainable adapter.

- ``bf16-true``/``16-true``: the base is loaded in that dtype; the adapter keeps fp32 master weights
  (``PeftLM._apply`` keeps Lightning's plugin from casting them down).
- ``bf16-mixed``/``16-mixed``: autocast runs the matmuls in the low dtype; the frozen linear weights are
  stored in that dtype (:func:`store_frozen_linears`), read straight in it from the checkpoint
  (:mod:`litpeft.loading`), the rest of the base in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from litpeft.methods.base import PeftLayer
from litpeft.speedups import SPEEDUPS

BASE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
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
    own ``dtype`` copy (the embedding lookup keeps the fp32 table): autocast would otherwise cast the whole
    vocabulary matrix twice a step (the model's own empty head call, then litpeft's at the loss positions),
    while the copy costs no more than the cast that autocast keeps for the backward. Embeddings, norms,
    all trainable tensors and the layers a PEFT layer reads in fp32 (:meth:`PeftLayer.fp32_base_layers`)
    keep fp32. Outside autocast, hooks run such a layer in ``dtype`` and return its output in the input's
    dtype, so the model still runs as before (e.g. called directly after ``fit``). Weights already loaded
    in ``dtype`` (:func:`litpeft.loading.storage_dtypes`) are kept as they are and get the same hooks.
    """
    if not SPEEDUPS.frozen_bf16:
        return 0
    tied = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    layers = frozen_linears(model, dtype)
    for module in layers:
        weight = module.weight
        if weight is tied:
            module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        else:
            module.weight.data = weight.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
        module._litpeft_stored = True
        module.register_forward_pre_hook(_outside_autocast_in)
        module.register_forward_hook(_outside_autocast_out)
    return len(layers)


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
