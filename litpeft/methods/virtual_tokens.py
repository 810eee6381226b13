"""The virtual-token mechanism shared by prompt tuning and P-tuning (:mod:`litpeft.methods.prompt`).

:class:`VirtualTokens` hooks the decoder backbone (``model.base_model``): a forward pre-hook turns
``input_ids`` into embeddings, inserts the ``N`` virtual tokens, and extends the attention mask, position
ids and token type ids; a forward hook removes the virtual positions from the returned hidden states. The
LM head, the loss (:func:`litpeft.loss.answer_logits` calls the whole model, whose backbone call is hooked)
and ``generate`` therefore all see the original sequence length. With the KV cache the virtual tokens are
processed once, at the first step; later steps only extend the mask and shift the positions.

Placement: all ``N`` before the input (prompt tuning, Lester et al. 2021, arXiv 2104.08691, sec. 2), or by
P-tuning's template ``[P_0:i] x [P_i+1:j] y ...`` (Liu et al. 2021, arXiv 2103.10385, sec. 3.2), whose
blocks and anchors go at points of the prompt style's text (:mod:`litpeft.methods.template`).

Positions: each sample sees its inserted tokens as part of its own sequence. Prepended tokens without
``position_ids``: the backbone numbers the extended sequence ``0..N+L-1`` (as Hugging Face peft does);
with ``position_ids`` (``generate`` derives them from the attention mask) real tokens are shifted by the
number of tokens inserted before them, so a left-padded row gives the same result as the row alone.
Packing: a row whose position ids restart (several samples, no mask) gets the virtual tokens before every
sample, each sample numbered from its own start, so transformers still finds the samples' borders from
the restarts and each packed sample gets the logits it gets alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer
from litpeft.methods.template import Block, is_prefix, layout


@dataclass(frozen=True)
class _Call:
    """What the forward hook of one backbone call needs to strip the inserted positions from its output."""

    real_index: torch.Tensor | None  # (batch, length): where each real token went; None: after N prepended


@dataclass(frozen=True)
class _Generation:
    """The first (uncached) call's layout, for the cached steps of the same generation."""

    length: int  # real tokens of the first call
    width: int  # its extended length (what the cache holds before the generated tokens)
    mask: torch.Tensor | None  # its extended attention mask
    shift: torch.Tensor  # (batch,) tokens inserted before the generated ones, per row


class VirtualTokens(nn.Module, PeftLayer):
    """Inserts ``num_virtual_tokens`` embeddings into the backbone's input; subclasses compute them.

    ``blocks`` (:class:`~litpeft.methods.template.Block`) say where: all before the input (prompt
    tuning), or P-tuning's template. ``anchor_ids`` are the template's anchor tokens, embedded by the
    model's own (frozen) input embeddings.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        blocks: list[Block],
        max_positions: int,
        anchor_ids: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens, self.blocks = num_virtual_tokens, blocks
        self.anchor_ids = list(anchor_ids or [])
        self.prefix_only = is_prefix(blocks)
        self.max_positions = max_positions
        self._calls: dict[int, _Call] = {}  # pre-hook -> forward hook of the same call, see hook_into
        self._generation: _Generation | None = None  # the layout, remembered for cached generation steps
        self._param_names: list[str] = []

    def virtual_tokens(self) -> torch.Tensor:
        """The ``(num_virtual_tokens, hidden)`` embeddings to insert."""
        raise NotImplementedError

    # -- hooks on the backbone ------------------------------------------------------------------------
    def hook_into(self, backbone: nn.Module) -> None:
        """Register the pre-hook (insert) and the forward hook (strip) on ``backbone``.

        The handoff between the two is keyed to the call: torch passes the kwargs dict that a
        ``with_kwargs`` pre-hook returns, as is, to the ``with_kwargs`` forward hooks of the same call
        (``Module._call_impl``). The pre-hook files a :class:`_Call` under that dict's ``id`` and the forward
        hook takes it out again; a call the pre-hook left alone (disabled, cached step) has no record and
        its output passes unchanged. ``always_call=True`` runs the forward hook even when the forward
        raises, so no record outlives its call, and nested calls each have their own dict. (A pre-hook
        registered after this one must keep the kwargs dict it is given, or return ``None``.)
        """
        params = inspect.signature(backbone.forward).parameters
        missing = [p for p in ("inputs_embeds", "attention_mask", "position_ids") if p not in params]
        if missing:
            raise LitPeftError(
                f"soft prompts need a backbone that accepts {' and '.join(missing)}; "
                f"{type(backbone).__name__}.forward does not"
            )
        self._param_names = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
        backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        backbone.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)

    def _pre_hook(
        self, backbone: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.disabled:
            return None
        kw = dict(zip(self._param_names, args, strict=False)) | kwargs
        cache = kw.get("cache", kw.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        mask, pos = kw.get("attention_mask"), kw.get("position_ids")
        if mask is not None and mask.ndim != 2:
            raise LitPeftError(
                f"soft prompts need a 2D attention mask (batch, length); got shape {tuple(mask.shape)}"
            )
        if past > 0:  # cached generation step: the virtual tokens are already in the cache
            self._cached_step(kw, past)
            return (), kw  # nothing to strip: no record

        input_ids, embeds = kw.pop("input_ids", None), kw.get("inputs_embeds")
        if embeds is None:
            embeds = backbone.get_input_embeddings()(input_ids)
        batch, length = embeds.shape[:2]
        n = self.num_virtual_tokens
        virtual = self.virtual_tokens().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        # a row of several samples (packing: no mask, position ids that restart) gets them before each
        packed = mask is None and pos is not None and bool((pos[..., 1:] - pos[..., :-1] != 1).any())
        if self.prefix_only and not packed:
            if length + n > self.max_positions:
                raise LitPeftError(
                    f"num_virtual_tokens={n} plus {length} input tokens exceed the model's context of "
                    f"{self.max_positions} positions"
                )
            kw["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
            if mask is not None:
                kw["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            if kw.get("token_type_ids") is not None:
                tt = kw["token_type_ids"].expand(batch, -1)
                kw["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)
            if pos is not None:
                first = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(batch, -1)
                kw["position_ids"] = torch.cat([first, pos.expand(batch, -1) + n], dim=1)
            shift = torch.full((batch,), n, dtype=torch.long, device=embeds.device)
            self._generation = _Generation(length, length + n, kw.get("attention_mask"), shift)
            self._calls[id(kw)] = _Call(None)
            return (), kw

        lay = layout(self.blocks, n, input_ids, mask, pos, batch, length, self.max_positions, embeds.device)
        anchors = embeds.new_zeros(0, embeds.shape[-1])
        if self.anchor_ids:
            ids = torch.tensor(self.anchor_ids, dtype=torch.long, device=embeds.device)
            anchors = backbone.get_input_embeddings()(ids).to(embeds.dtype)
        pad = embeds.new_zeros(batch, 1, embeds.shape[-1])
        src = torch.cat([embeds, virtual, anchors.unsqueeze(0).expand(batch, -1, -1), pad], dim=1)
        kw["inputs_embeds"] = src.gather(1, lay.order[..., None].expand(-1, -1, src.shape[-1]))
        kw["attention_mask"] = lay.mask
        kw["position_ids"] = lay.positions
        if kw.get("token_type_ids") is not None:
            tt = kw["token_type_ids"].expand(batch, -1)
            tt = torch.cat([tt, tt.new_zeros(batch, src.shape[1] - length)], dim=1)
            kw["token_type_ids"] = tt.gather(1, lay.order)
        self._generation = _Generation(length, lay.order.shape[1], lay.mask, lay.shift)
        self._calls[id(kw)] = _Call(lay.real_index)
        return (), kw

    def _cached_step(self, kw: dict[str, Any], past: int) -> None:
        """Extend the mask and shift the positions as the first call did (its layout is in the cache)."""
        mask, pos = kw.get("attention_mask"), kw.get("position_ids")
        tokens = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        batch, current = tokens.shape[:2]
        gen = self._generation
        if gen is None or len(gen.shift) != batch:
            if not self.prefix_only:
                raise LitPeftError("cached generation step without a matching first step (P-tuning template)")
            n = self.num_virtual_tokens  # prepended: nothing else to know
            ones = torch.ones(batch, n, dtype=torch.long, device=tokens.device)
            gen = _Generation(0, n, ones if mask is not None else None, ones[:, 0] * n)
        old = gen.mask
        if mask is not None:
            head = old if old is not None else mask.new_ones(batch, gen.width)
            kw["attention_mask"] = torch.cat([head.to(mask.dtype), mask[:, gen.length :]], dim=1)
        elif old is not None and not bool(old.all()):
            kw["attention_mask"] = torch.cat([old, old.new_ones(batch, past - gen.width + current)], dim=1)
        if pos is not None:
            kw["position_ids"] = pos + gen.shift[:, None].to(pos.dtype)
        elif not self.prefix_only:  # the first call numbered each row itself
            start = gen.length + past - gen.width
            kw["position_ids"] = (
                torch.arange(start, start + current, device=tokens.device) + gen.shift[:, None]
            )

    def _post_hook(self, backbone: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        call = self._calls.pop(id(kwargs), None)
        if call is None or output is None:  # not inserted by this call, or the forward raised
            return output

        def strip(h: torch.Tensor) -> torch.Tensor:
            if call.real_index is None:
                return h[:, self.num_virtual_tokens :].contiguous()
            return h.gather(1, call.real_index[..., None].expand(-1, -1, h.shape[-1]))

        if isinstance(output, tuple):
            return (strip(output[0]), *output[1:])
        output.last_hidden_state = strip(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(None if h is None else strip(h) for h in output.hidden_states)
        return output


class PromptEmbedding(VirtualTokens):
    """Prompt tuning's virtual tokens: a plain ``(N, hidden)`` embedding table (peft's ``embedding``)."""

    def __init__(
        self, num_virtual_tokens: int, hidden: int, max_positions: int, weight: torch.Tensor
    ) -> None:
        super().__init__(num_virtual_tokens, [Block((0, num_virtual_tokens))], max_positions)
        # fp32 whatever the base's dtype (a trainable; cast to the embeddings' dtype where inserted)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)

    def virtual_tokens(self) -> torch.Tensor:
        return self.embedding.weight


class PTuningEncoder(VirtualTokens):
    """P-tuning's prompt encoder (paper section 3.2; peft's ``PromptEncoder`` layout).

    ``lstm``: ``h = MLP(BiLSTM(e))`` with the MLP ``Linear(2H, 2H) -> ReLU -> Linear(2H, d)``;
    ``mlp``: ``h = Linear(H, d)(ReLU(Linear(H, H)(ReLU(Linear(d, H)(e)))))``. Once trained only ``h`` is
    needed: :meth:`freeze_output` replaces the encoder by its output (what is saved and exported).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        hidden: int,
        max_positions: int,
        encoder: str,
        encoder_hidden_size: int,
        encoder_num_layers: int,
        encoder_dropout: float,
        blocks: list[Block],
        anchor_ids: list[int],
        device: torch.device,
    ) -> None:
        super().__init__(num_virtual_tokens, blocks, max_positions, anchor_ids)
        # fp32 whatever the base's dtype (trainables; the output is cast to the embeddings' dtype)
        h, f = encoder_hidden_size, {"device": device, "dtype": torch.float32}
        self.encoder = encoder
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, **f)
        self.lstm_head: nn.LSTM | None = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                hidden,
                h,
                num_layers=encoder_num_layers,
                dropout=encoder_dropout if encoder_num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
                **f,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * h, 2 * h, **f), nn.ReLU(), nn.Linear(2 * h, hidden, **f)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden, h, **f),
                nn.ReLU(),
                nn.Linear(h, h, **f),
                nn.ReLU(),
                nn.Linear(h, hidden, **f),
            )
        self.prompt_embeddings: nn.Parameter | None = None  # set by freeze_output

    def encode(self) -> torch.Tensor:
        e = self.embedding.weight.unsqueeze(0)
        if self.lstm_head is not None:
            e = self.lstm_head(e.to(self.lstm_head.weight_ih_l0.dtype))[0]
        return self.mlp_head(e)[0]

    def virtual_tokens(self) -> torch.Tensor:
        return self.prompt_embeddings if self.prompt_embeddings is not None else self.encode()

    def freeze_output(self, embeddings: torch.Tensor) -> None:
        """Use fixed ``embeddings`` as the virtual tokens and drop the encoder (inference form)."""
        w = self.embedding.weight
        self.prompt_embeddings = nn.Parameter(embeddings.to(w.device, w.dtype), requires_grad=False)
        del self.embedding, self.mlp_head
        self.lstm_head = None
