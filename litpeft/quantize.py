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
    :class:`QuantizedLinear` (in place; one layer at a time, so the peak is one extra layer).

    A model already quantized (a checkpoint quantized by bitsandbytes, see :func:`adopt_bnb`) is left as
    it is when ``mode`` is its mode, and refused otherwise."""
    check_mode(mode)
    if mode is None:
        return model
    check_stored_mode(mode, quantized_mode(model))
    if quantized_mode(model) is not None:
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


# -- checkpoints already quantized by transformers + bitsandbytes ---------------------------------------


def quantized_mode(model: nn.Module) -> str | None:
    """The mode of ``model``'s :class:`QuantizedLinear` layers; None when it has none."""
    return next((m.mode for m in model.modules() if isinstance(m, QuantizedLinear)), None)


def check_stored_mode(asked: str | None, stored: str | None) -> str | None:
    """The mode to run with when the checkpoint is stored quantized as ``stored`` and ``asked`` is
    ``model.quantize``: the stored one (``asked`` must be null or equal to it)."""
    if stored is not None and asked not in (None, stored):
        raise LitPeftError(f"the checkpoint is already {stored}; drop --model.quantize or set it to {stored}")
    return stored or asked


def checkpoint_mode(config: Any) -> QuantMode | None:
    """The litpeft mode of a checkpoint quantized by transformers + bitsandbytes, read from its config's
    ``quantization_config`` (``load_in_4bit`` with ``bnb_4bit_quant_type`` nf4/fp4 and
    ``bnb_4bit_use_double_quant``, or ``load_in_8bit``); None for a checkpoint that is not quantized by
    bitsandbytes."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        return None  # another method (GPTQ, FP8, MXFP4, ...): transformers' own loading, as before
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        if qc.get("llm_int8_has_fp16_weight"):
            raise LitPeftError(
                "the checkpoint is 8-bit with llm_int8_has_fp16_weight: its weights are not int8"
            )
        return "int8"
    kind, double = qc.get("bnb_4bit_quant_type", "fp4"), bool(qc.get("bnb_4bit_use_double_quant"))
    if kind == "fp4" and double:
        raise LitPeftError("the checkpoint is fp4 with double quantization, which litpeft does not read")
    return "nf4-dq" if double else kind


def from_bnb(layer: nn.Module, mode: QuantMode) -> QuantizedLinear:
    """A :class:`QuantizedLinear` holding the very tensors of a bitsandbytes ``Linear4bit``/``Linear8bitLt``
    as transformers loads them from a quantized checkpoint (``Params4bit.from_prequantized``; ``Int8Params``
    and its ``SCB``): no copy, nothing dequantized. A layer on the meta device gives a meta layer."""
    weight = layer.weight
    q = QuantizedLinear(layer.in_features, layer.out_features, layer.bias is not None, mode, device="meta")
    q.from_conv1d = issubclass(getattr(layer, "source_cls", nn.Linear), Conv1D)
    if layer.bias is not None:
        q.bias = _frozen(layer.bias.detach())
    if weight.is_meta:
        return q
    state = getattr(weight, "quant_state", None)
    stored = "int8" if state is None else "nf4-dq" if state.nested else state.quant_type
    if stored != mode or (mode == "int8" and weight.dtype != torch.int8):
        raise LitPeftError(f"the checkpoint's config says {mode}, its layers are stored {stored}")
    if mode == "int8":
        q.qweight, q.absmax = _frozen(weight.data), _frozen(weight.SCB)
        return q
    nested = state.state2.blocksize if state.nested else NESTED_BLOCKSIZE
    if (state.blocksize, nested) != (BLOCKSIZE, NESTED_BLOCKSIZE):
        raise LitPeftError(
            f"the checkpoint's 4-bit blocks are {state.blocksize} (nested {nested}); litpeft reads "
            f"{BLOCKSIZE} (nested {NESTED_BLOCKSIZE}), bitsandbytes' default"
        )
    # bnb_4bit_quant_storage other than uint8 (FSDP-QLoRA checkpoints) holds the same bytes
    q.qweight = _frozen(weight.data.view(torch.uint8).reshape(-1, 1))
    q.absmax = _frozen(state.absmax)
    if mode == "nf4-dq":
        q.nested_absmax, q.nested_code = _frozen(state.state2.absmax), _frozen(state.state2.code)
        q.nested_offset = _frozen(state.offset.reshape(1).float())
    return q


def adopt_bnb(model: nn.Module, mode: QuantMode, dtype: torch.dtype, dtypes: dict[str, torch.dtype]) -> None:
    """Replace, in place, the bitsandbytes layers transformers built for a quantized checkpoint by
    :class:`QuantizedLinear` layers holding the same tensors (:func:`from_bnb`), and make the model a plain
    transformers model again (the quantized layers are litpeft's now: ``.to(dtype)``, ``save_pretrained``
    of a merged model and FSDP treat it like any other).

    transformers reads the unquantized tensors of such a checkpoint (norms, embeddings, LM head) in the
    checkpoint's dtype whatever ``dtype`` it is given; they are cast here to ``dtypes[name]``, else to
    ``dtype``, as litpeft reads an unquantized checkpoint (see :mod:`litpeft.loading`).
    """
    import bitsandbytes as bnb

    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    quantized = [name for name, m in model.named_modules() if isinstance(m, layers)]
    for name in quantized:
        model.set_submodule(name, from_bnb(model.get_submodule(name), mode))
    if not quantized:
        raise LitPeftError(f"the checkpoint's config says {mode}, but no layer of it is quantized")
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # the conversions transformers recorded to read (and, on save, write back) the packed tensors
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is not None:
        model._weight_conversions = [
            c
            for c in conversions
            if not any(getattr(op, "hf_quantizer", None) for op in getattr(c, "operations", ()))
        ]
    packed = {id(p) for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()}
    bias = {id(m.bias) for m in model.modules() if isinstance(m, QuantizedLinear) and m.bias is not None}
    for name, p in model.named_parameters():
        target = dtypes.get(name, dtype)
        if (id(p) not in packed or id(p) in bias) and p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
