"""A quantized frozen base: the "Q" of QLoRA (Dettmers et al. 2023, arXiv 2305.14314), for every method.

``quantize_model(model, "nf4")`` replaces each linear layer of the base (not the LM head) by a
:class:`QuantizedLinear` that stores its weight in 4 or 8 bits and dequantizes it to the compute dtype
at use, in the forward pass and again in the backward pass (the weight is frozen, so only the input
gradient ``dL/dx = dL/dy W`` is needed: nothing of the full-precision weight is kept between the two)::

    nf4     4-bit NormalFloat, blocks of 64 weights share one fp32 absmax (QLoRA sec. 3)
    nf4-dq  nf4 with double quantization: the absmaxes themselves in 8 bits (QLoRA sec. 3, "DQ")
    fp4     4-bit float, blocks of 64
    int8    8 bits per weight, one fp32 scale per output row (LLM.int8()'s vector-wise quantization,
            Dettmers et al. 2022, arXiv 2208.07339, without the outlier decomposition)

The kernels are bitsandbytes' (``quantize_4bit``/``dequantize_4bit``, ``int8_vectorwise_quant``); the
layer is litpeft's own, for three reasons measured on a CPU without a GPU (see docs/scale.md):

- bitsandbytes' ``Linear4bit`` repacks its weight into a CPU inference format after any forward pass in
  eval mode without grad (Lightning's sanity check does one) when the CPU has AVX512-BF16; that format
  has no backward, so LoRA silently stops learning. This layer never repacks.
- Its quantized tensors are plain ``uint8``/``int8``/``float32`` parameters, so FSDP2 ``fully_shard``
  shards and all-gathers them like any other (``Params4bit``'s quant state and ``Int8Params``' ``CB``
  are attributes that sharding loses).
- torchao's NF4 tensor dequantizes about 10x slower on this CPU than bitsandbytes' kernel.

``QuantizedLinear`` subclasses ``nn.Linear`` so every method that targets linear layers finds it, and its
``weight`` is a read-only property that returns the dequantized weight (fp32) for code that inspects it
(LoRA's shape checks, DoRA's norms, merging). Merging an adapter into a quantized base therefore writes
plain 16/32-bit linear layers, not a quantized model.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError

QuantMode = Literal["nf4", "nf4-dq", "fp4", "int8"]
MODES: tuple[str, ...] = ("nf4", "nf4-dq", "fp4", "int8")
BLOCKSIZE = 64  # QLoRA's block size for the 4-bit weights
NESTED_BLOCKSIZE = 256  # and for the 8-bit absmaxes under double quantization


def _bnb() -> Any:
    # bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional inference kernel is missing;
    # this layer never uses that kernel.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:  # optional and heavy (pip install 'litpeft[quant]'): imported on first use
        import bitsandbytes.functional as bnbF
    except ImportError as e:
        raise LitPeftError(
            "model.quantize needs bitsandbytes: pip install 'litpeft[quant]' (bitsandbytes>=0.47)"
        ) from e
    return bnbF


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise LitPeftError(f"model.quantize must be one of {', '.join(MODES)} or null, got {mode!r}")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _DequantizedMatmul(torch.autograd.Function):
    """``y = x W^T`` with ``W`` dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return x.to(dtype) @ layer.dequantize(dtype).T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.layer.dequantize(ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None, None


class QuantizedLinear(nn.Linear):
    """A frozen linear layer with a 4-bit (nf4, nf4-dq, fp4) or 8-bit (int8) weight; see the module docstring.

    The compute dtype is the autocast dtype under autocast (``bf16-mixed``, ``16-mixed``), else the input's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        mode: QuantMode,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no full-precision weight parameter
        check_mode(mode)
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        #: quantized from a GPT-2 ``Conv1D`` (merging must give one back, in its ``(in, out)`` layout)
        self.from_conv1d = False
        n = in_features * out_features
        empty = dict(device=device)
        if mode == "int8":
            self.qweight = _frozen(torch.empty(out_features, in_features, dtype=torch.int8, **empty))
            self.absmax = _frozen(torch.empty(out_features, dtype=torch.float32, **empty))
        else:
            n_blocks = math.ceil(n / BLOCKSIZE)
            self.qweight = _frozen(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **empty))
            if mode == "nf4-dq":
                self.absmax = _frozen(torch.empty(n_blocks, dtype=torch.uint8, **empty))
                n_nested = math.ceil(n_blocks / NESTED_BLOCKSIZE)
                self.nested_absmax = _frozen(torch.empty(n_nested, dtype=torch.float32, **empty))
                self.nested_code = _frozen(torch.empty(256, dtype=torch.float32, **empty))
                self.nested_offset = _frozen(torch.empty(1, dtype=torch.float32, **empty))
            else:
                self.absmax = _frozen(torch.empty(n_blocks, dtype=torch.float32, **empty))
        self.bias = _frozen(torch.empty(out_features, **empty)) if bias else None

    @classmethod
    def from_float(cls, layer: nn.Module, mode: QuantMode) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (or GPT-2 ``Conv1D``, whose ``(in, out)`` weight is transposed first)."""
        weight = layer.weight.detach()
        weight = weight.T if isinstance(layer, Conv1D) else weight
        out_features, in_features = weight.shape
        bias = getattr(layer, "bias", None)
        q = cls(in_features, out_features, bias is not None, mode, device=weight.device)
        q.from_conv1d = isinstance(layer, Conv1D)
        if bias is not None:
            q.bias = _frozen(bias.detach().clone())
        if weight.is_meta:
            return q
        bnbF = _bnb()
        weight = weight.contiguous() if weight.dtype in (torch.float32, torch.bfloat16) else weight.float()
        if mode == "int8":
            qweight, scale, _ = bnbF.int8_vectorwise_quant(weight.float().contiguous())
            q.qweight.data, q.absmax.data = qweight, scale.float()
            return q
        qweight, state = bnbF.quantize_4bit(
            weight,
            blocksize=BLOCKSIZE,
            quant_type="fp4" if mode == "fp4" else "nf4",
            compress_statistics=mode == "nf4-dq",
        )
        q.qweight.data, q.absmax.data = qweight, state.absmax
        if mode == "nf4-dq":
            q.nested_absmax.data = state.state2.absmax.float()
            q.nested_code.data = state.state2.code.float()
            q.nested_offset.data = state.offset.reshape(1).float()
        return q

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight, ``(out_features, in_features)``, in ``dtype``."""
        shape = (self.out_features, self.in_features)
        if self.qweight.is_meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        bnbF = _bnb()
        if self.mode == "int8":
            if dtype in (torch.bfloat16, torch.float16):
                # w = q * absmax / 127 straight in the 16-bit dtype (|q| <= 127 is exact there): several
                # times faster on the CPU than bitsandbytes' fp32 dequantization and then a cast.
                return self.qweight.to(dtype) * (self.absmax / 127).to(dtype)[:, None]
            return bnbF.int8_vectorwise_dequant(self.qweight, self.absmax).to(dtype)
        state2 = None
        if self.mode == "nf4-dq":
            state2 = bnbF.QuantState(
                absmax=self.nested_absmax,
                code=self.nested_code,
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        state = bnbF.QuantState(
            absmax=self.absmax,
            shape=torch.Size(shape),
            blocksize=BLOCKSIZE,
            quant_type="fp4" if self.mode == "fp4" else "nf4",
            dtype=dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32,
            offset=self.nested_offset[0] if state2 is not None else None,
            state2=state2,
        )
        return bnbF.dequantize_4bit(self.qweight, state).to(dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight in fp32 (a fresh tensor: writing to it changes nothing)."""
        return self.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        out = _DequantizedMatmul.apply(x, self, dtype)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def reset_parameters(self) -> None:
        """Nothing to initialise: the quantized tensors are loaded, not drawn."""

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        # A precision plugin's ``module.to(bf16)`` must not touch the absmaxes (bitsandbytes wants fp32):
        # device moves apply, dtype casts do not.
        def move_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(device=out.device) if t is not self.bias and out.dtype != t.dtype else out

        return super()._apply(move_only, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_model(model: nn.Module, mode: QuantMode, skip: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Replace every linear layer of ``model`` except its output layer (LM head) and ``skip`` by a
    :class:`QuantizedLinear` (in place; one layer at a time, so the peak is one extra layer)."""
    check_mode(mode)
    if mode is None:
        return model
    if not any(p.is_meta for p in model.parameters()):
        _bnb()
    targets = quantize_targets(model, skip)
    if not targets:
        raise LitPeftError(f"model.quantize={mode}: {type(model).__name__} has no linear layer to quantize")
    for name in targets:
        model.set_submodule(name, QuantizedLinear.from_float(model.get_submodule(name), mode))
    return model


def quantize_targets(model: nn.Module, skip: tuple[nn.Module, ...] = ()) -> list[str]:
    """Names of the layers :func:`quantize_model` replaces: every linear layer but the LM head and ``skip``."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = (*skip, output) if output is not None else skip
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and not isinstance(m, QuantizedLinear) and m not in skip
    ]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters (quantized and not) of ``model``."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plain_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A frozen plain layer of ``layer``'s original kind: ``nn.Linear``, or GPT-2's ``Conv1D`` for a
    ``Conv1D`` or a :class:`QuantizedLinear` made from one. ``weight`` is ``(out, in)``; merges use this
    to replace an adapted or quantized layer by one that ``from_pretrained`` loads back."""
    out_features, in_features = weight.shape
    if isinstance(layer, Conv1D) or getattr(layer, "from_conv1d", False):
        plain: nn.Module = Conv1D(out_features, in_features)
        weight = weight.T
    else:
        plain = nn.Linear(in_features, out_features, bias=bias is not None)
    plain.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    plain.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return plain.to(weight.device)
