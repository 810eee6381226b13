"""The virtual-token mechanism shared by prompt tuning and P-tuning (:mod:`litpeft.methods.prompt`).

:class:`VirtualTokens` hooks the decoder backbone (``model.base_model``): a forward pre-hook turns
``input_ids`` into embeddings, inserts the ``N`` virtual tokens, and extends the attention mask, position
ids and token type ids; a forward hook removes the virtual positions from the returned hidden states. The
LM head, the loss (:func:`litpeft.loss.answer_logits` calls the whole model, whose backbone call is hooked)
and ``generate`` therefore all see the original sequence length. With the KV cache the virtual tokens are
processed once, at the first step; later steps only extend the mask and shift the positions.

Positions: the model sees the virtual tokens as the first ``N`` tokens of the sequence. Without explicit
``position_ids`` the backbone numbers the extended sequence ``0..N+L-1`` (as Hugging Face peft does); with
``position_ids`` (``generate`` derives them from the attention mask) real tokens are shifted by the number of
virtual tokens before them, so a left-padded row gives the same result as the row alone.

Placement: all ``N`` before the input (prompt tuning, Lester et al. 2021, arXiv 2104.08691, sec. 2), or split
around a marker as P-tuning's template ``[P_0:i] x [P_i:N] y`` (Liu et al. 2021, arXiv 2103.10385, sec. 3.2).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer


@dataclass(frozen=True)
class _Call:
    """What the forward hook of one backbone call needs to strip the virtual positions from its output."""

    length: int  # real tokens in the input
    points: torch.Tensor | None  # per row, where the second block went (split placement), else None


class VirtualTokens(nn.Module, PeftLayer):
    """Inserts ``num_virtual_tokens`` embeddings into the backbone's input; subclasses compute them.

    ``num_before`` of them go before the input; the rest (``placement="split"``) go right after the last
    occurrence of ``split_marker_ids`` in each row (e.g. the assistant header, so they sit between the
    prompt ``x`` and the response ``y`` in training and at the end of the prompt in generation).
    """

    def __init__(
        self, num_virtual_tokens: int, num_before: int, split_marker_ids: list[int] | None, max_positions: int
    ) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_before = num_virtual_tokens, num_before
        self.split_marker_ids = split_marker_ids
        self.max_positions = max_positions
        self._calls: dict[int, _Call] = {}  # pre-hook -> forward hook of the same call, see hook_into
        self._split_points: torch.Tensor | None = None  # per row, remembered for cached generation steps
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
        missing = [p for p in ("inputs_embeds", "attention_mask") if p not in params]
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
        n = self.num_virtual_tokens
        if past > 0:  # cached generation step: the virtual tokens are already in the cache
            if mask is not None:
                b = len(mask)
                kw["attention_mask"] = self._insert(mask, mask.new_ones(b, n), self._points(b))
            if pos is not None:
                kw["position_ids"] = pos + n
            return (), kw  # nothing to strip: no record

        input_ids, embeds = kw.pop("input_ids", None), kw.get("inputs_embeds")
        if embeds is None:
            embeds = backbone.get_input_embeddings()(input_ids)
        batch, length = embeds.shape[:2]
        if length + n > self.max_positions:
            raise LitPeftError(
                f"num_virtual_tokens={n} plus {length} input tokens exceed the model's context of "
                f"{self.max_positions} positions"
            )
        virtual = self.virtual_tokens().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        points = self._find_split_points(input_ids, mask) if self.split_marker_ids else None
        self._split_points = points
        kw["inputs_embeds"] = self._insert(embeds, virtual, points)
        if mask is not None:
            kw["attention_mask"] = self._insert(mask, mask.new_ones(batch, n), points)
        if kw.get("token_type_ids") is not None:
            tt = kw["token_type_ids"].expand(batch, -1)
            kw["token_type_ids"] = self._insert(tt, tt.new_zeros(batch, n), points)
        if pos is not None:
            kw["position_ids"] = self._positions(pos.expand(batch, -1), points)
        self._calls[id(kw)] = _Call(length, points)
        return (), kw

    def _post_hook(self, backbone: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        call = self._calls.pop(id(kwargs), None)
        if call is None or output is None:  # not inserted by this call, or the forward raised
            return output

        def strip(h: torch.Tensor) -> torch.Tensor:
            if call.points is None:
                return h[:, self.num_virtual_tokens :].contiguous()
            idx = self._real_index(len(h), call.length, call.points, h.device)
            return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))

        if isinstance(output, tuple):
            return (strip(output[0]), *output[1:])
        output.last_hidden_state = strip(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(None if h is None else strip(h) for h in output.hidden_states)
        return output

    # -- layout -------------------------------------------------------------------------------------------
    def _points(self, batch: int) -> torch.Tensor | None:
        if not self.split_marker_ids:
            return None
        if self._split_points is None or len(self._split_points) != batch:
            raise LitPeftError("cached generation step without a matching first step (split placement)")
        return self._split_points

    def _find_split_points(self, input_ids: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Per row: the index right after the last occurrence of the split marker among real tokens."""
        marker = self.split_marker_ids
        assert marker is not None
        if input_ids is None:
            raise LitPeftError(
                "placement='split' needs input_ids (it looks for split_marker), not inputs_embeds"
            )
        m = len(marker)
        if input_ids.shape[1] < m:
            raise LitPeftError(f"placement='split': split_marker ({m} tokens) is longer than the input")
        windows = input_ids.unfold(1, m, 1)  # (batch, length - m + 1, m)
        hit = (windows == torch.tensor(marker, device=input_ids.device)).all(-1)
        if mask is not None:
            hit &= mask.unfold(1, m, 1).bool().all(-1)
        if not bool(hit.any(1).all()):
            raise LitPeftError(
                f"placement='split': split_marker (token ids {marker}) not found in every sequence of the batch"
            )
        starts = torch.arange(hit.shape[1], device=hit.device).expand_as(hit)
        return torch.where(hit, starts, -1).amax(1) + m

    def _order(self, batch: int, length: int, points: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Index into ``cat([real (length), virtual (N)])`` giving the extended sequence, per row."""
        n0, n = self.num_before, self.num_virtual_tokens
        new = torch.arange(length + n, device=device).expand(batch, -1)
        p = points[:, None]
        # new position t: first block (t < n0) -> virtual t; then real tokens up to the split point;
        # then the second block; then the remaining real tokens.
        real_idx = torch.where(new < n0 + p, new - n0, new - n)
        virt_idx = torch.where(new < n0, new, new - p) + length
        is_virtual = (new < n0) | ((new >= n0 + p) & (new < n + p))
        return torch.where(is_virtual, virt_idx, real_idx)

    def _real_index(
        self, batch: int, length: int, points: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Position of each real token in the extended sequence."""
        j = torch.arange(length, device=device).expand(batch, -1)
        return j + self.num_before + (self.num_virtual_tokens - self.num_before) * (j >= points[:, None])

    def _insert(self, real: torch.Tensor, virtual: torch.Tensor, points: torch.Tensor | None) -> torch.Tensor:
        if points is None:
            return torch.cat([virtual, real], dim=1)
        src = torch.cat([real, virtual], dim=1)
        order = self._order(len(real), real.shape[1], points, real.device)
        if src.ndim == 3:
            order = order[..., None].expand(-1, -1, src.shape[-1])
        return src.gather(1, order)

    def _positions(self, pos: torch.Tensor, points: torch.Tensor | None) -> torch.Tensor:
        """Virtual tokens continue the numbering of the token before them; real tokens shift past them."""
        n0, n = self.num_before, self.num_virtual_tokens
        first = torch.arange(n0, device=pos.device, dtype=pos.dtype).expand(len(pos), -1)
        if points is None:
            return torch.cat([first, pos + n], dim=1)
        j = torch.arange(pos.shape[1], device=pos.device)
        real = pos + n0 + (n - n0) * (j >= points[:, None])
        before = pos.gather(1, (points - 1)[:, None]) + n0
        second = before + 1 + torch.arange(n - n0, device=pos.device, dtype=pos.dtype)
        return self._insert(real, torch.cat([first, second], dim=1), points)


class PromptEmbedding(VirtualTokens):
    """Prompt tuning's virtual tokens: a plain ``(N, hidden)`` embedding table (peft's ``embedding``)."""

    def __init__(
        self, num_virtual_tokens: int, hidden: int, max_positions: int, weight: torch.Tensor
    ) -> None:
        super().__init__(num_virtual_tokens, num_virtual_tokens, None, max_positions)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, device=weight.device, dtype=weight.dtype)
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
        num_before: int,
        split_marker_ids: list[int] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(num_virtual_tokens, num_before, split_marker_ids, max_positions)
        h, f = encoder_hidden_size, {"device": device, "dtype": dtype}
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
