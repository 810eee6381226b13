"""Soft prompts at the input: prompt tuning and P-tuning.

Prompt tuning (Lester et al. 2021, arXiv 2104.08691) learns ``N`` virtual token embeddings ``P`` and feeds
``[P; E(x)]`` to the frozen model (section 2). P-tuning (Liu et al. 2021, arXiv 2103.10385) produces the
virtual tokens with a prompt encoder, ``P = MLP(BiLSTM(e))`` over trainable inputs ``e`` (section 3.2), and
places them by a template; ``[P_0:i] x [P_i:N] y`` splits them around the input.

Both share one mechanism, :class:`VirtualTokens`: a forward pre-hook on the decoder backbone
(``model.base_model``) turns ``input_ids`` into embeddings, inserts the virtual tokens, and extends the
attention mask, position ids and token type ids; a forward hook removes the virtual positions from the
returned hidden states. The LM head, the loss, ``PeftLM.loss_and_accuracy`` (which calls the backbone
directly) and ``generate`` therefore all see the original sequence length. With the KV cache the virtual
tokens are processed once, at the first step; later steps only extend the mask and shift the positions.

Positions: the model sees the virtual tokens as the first ``N`` tokens of the sequence. Without explicit
``position_ids`` the backbone numbers the extended sequence ``0..N+L-1`` (as Hugging Face peft does); with
``position_ids`` (``generate`` derives them from the attention mask) real tokens are shifted by the number of
virtual tokens before them, so a left-padded row gives the same result as the row alone.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer, PeftMethod


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
        self._pending: list[Any] = []  # pre-hook -> hook: how to strip the virtual positions
        self._split_points: torch.Tensor | None = None  # per row, remembered for cached generation steps
        self._param_names: list[str] = []

    def virtual_tokens(self) -> torch.Tensor:
        """The ``(num_virtual_tokens, hidden)`` embeddings to insert."""
        raise NotImplementedError

    # -- hooks on the backbone ------------------------------------------------------------------------
    def attach(self, backbone: nn.Module) -> None:
        params = inspect.signature(backbone.forward).parameters
        missing = [p for p in ("inputs_embeds", "attention_mask") if p not in params]
        if missing:
            raise LitPeftError(
                f"soft prompts need a backbone that accepts {' and '.join(missing)}; "
                f"{type(backbone).__name__}.forward does not"
            )
        self._param_names = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
        backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        backbone.register_forward_hook(self._post_hook)

    def _pre_hook(
        self, backbone: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.disabled:
            self._pending.append(None)
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
            self._pending.append(None)
            return (), kw

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
        self._pending.append((length, points))
        return (), kw

    def _post_hook(self, backbone: nn.Module, args: Any, output: Any) -> Any:
        pending = self._pending.pop()
        if pending is None:
            return output
        length, points = pending

        def strip(h: torch.Tensor) -> torch.Tensor:
            if points is None:
                return h[:, self.num_virtual_tokens :].contiguous()
            idx = self._real_index(len(h), length, points, h.device)
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


# -- the methods ---------------------------------------------------------------------------------------
def _check_model(model: PreTrainedModel, method: str) -> tuple[nn.Module, int, int]:
    """The decoder backbone, hidden size and context length, or a clear refusal."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise LitPeftError(
            f"{method} supports decoder-only causal LMs; {type(model).__name__} is an encoder-decoder model"
        )
    backbone = model.base_model
    if backbone is model or not hasattr(backbone, "get_input_embeddings"):
        raise LitPeftError(f"{method}: {type(model).__name__} has no separate decoder backbone (base_model)")
    hidden = backbone.get_input_embeddings().weight.shape[1]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = getattr(text, "max_position_embeddings", None) or 1 << 62
    return backbone, hidden, max_positions


def _load_tokenizer(spec: str | None, model: PreTrainedModel, option: str) -> Any:
    from litpeft.models import load_tokenizer

    spec = spec or getattr(model, "name_or_path", "") or None
    if not spec:
        raise LitPeftError(f"{option} needs a tokenizer: set `tokenizer` (a model spec, e.g. tiny:llama)")
    return load_tokenizer(spec)


def _check_num_virtual_tokens(n: int, max_positions: int | None = None) -> None:
    if not isinstance(n, int) or n <= 0:
        raise LitPeftError(f"num_virtual_tokens must be a positive integer, got {n!r}")
    if max_positions is not None and n >= max_positions:
        raise LitPeftError(
            f"num_virtual_tokens={n} leaves no room for input in the model's context of {max_positions}"
        )


def _peft_common(model: PreTrainedModel, n: int) -> dict[str, Any]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": n,
        "token_dim": model.get_input_embeddings().weight.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
    }


class PromptTuning(PeftMethod):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings before the input.

    Args:
        num_virtual_tokens: prompt length ``N``.
        init: ``random``: uniform in ``[-init_range, init_range]`` (the paper's 0.5); ``vocab``: rows of the
            embedding matrix sampled uniformly from the vocabulary (the paper samples from the 5,000 most
            common tokens; token frequencies are not known here); ``text``: the embeddings of ``init_text``,
            repeated or truncated to ``N`` (the paper's class-label init generalised, as peft).
        init_text: text for ``init: text``.
        tokenizer: model spec whose tokenizer tokenizes ``init_text``; default the base model's own.
        init_range: half-width of the ``random`` init.
    """

    name = "prompt_tuning"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: Literal["random", "vocab", "text"] = "random",
        init_text: str | None = None,
        tokenizer: str | None = None,
        init_range: float = 0.5,
    ) -> None:
        _check_num_virtual_tokens(num_virtual_tokens)
        if init not in ("random", "vocab", "text"):
            raise LitPeftError(f"init must be random, vocab or text, got {init!r}")
        if init == "text" and not init_text:
            raise LitPeftError("init='text' needs init_text")
        self.num_virtual_tokens, self.init, self.init_text = num_virtual_tokens, init, init_text
        self.tokenizer, self.init_range = tokenizer, init_range

    def inject(self, model: PreTrainedModel) -> None:
        backbone, hidden, max_positions = _check_model(model, "prompt tuning")
        n = self.num_virtual_tokens
        _check_num_virtual_tokens(n, max_positions)
        table = backbone.get_input_embeddings().weight
        if self.init == "random":
            weight = torch.empty(n, hidden, device=table.device).uniform_(-self.init_range, self.init_range)
        elif self.init == "vocab":
            weight = table[torch.randint(0, table.shape[0], (n,), device=table.device)].detach().float()
        else:
            tok = _load_tokenizer(self.tokenizer, model, "init='text'")
            ids = tok(self.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise LitPeftError("init_text tokenizes to no tokens")
            if len(ids) > max_positions:
                raise LitPeftError(
                    f"init_text is {len(ids)} tokens, longer than the model's context of {max_positions}"
                )
            ids = (ids * math.ceil(n / len(ids)))[:n]
            weight = table[torch.tensor(ids, device=table.device)].detach().float()
        prompt = PromptEmbedding(n, hidden, max_positions, weight.to(table.dtype))
        model.add_module("prompt_encoder", prompt)
        prompt.attach(backbone)

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        raise LitPeftError(
            "prompt tuning cannot be merged into the base weights: its virtual tokens are extra inputs"
        )

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft ``PROMPT_TUNING``: ``prompt_embeddings`` is the ``(N, hidden)`` table.

        The init is written as ``RANDOM``: in inference mode peft loads the table and ignores the init
        (``TEXT`` would make peft load a tokenizer from the hub).
        """
        config = {"peft_type": "PROMPT_TUNING", **_peft_common(model, self.num_virtual_tokens)}
        config |= {
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
        }
        return config, {"prompt_embeddings": state["prompt_encoder.embedding.weight"]}


class PTuning(PeftMethod):
    """P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder.

    Args:
        num_virtual_tokens: number of virtual tokens ``N``.
        encoder: ``lstm`` (bidirectional LSTM + 2-layer MLP, as the paper) or ``mlp`` (3-layer MLP).
        encoder_hidden_size: hidden size ``H`` of the encoder; default the model's hidden size.
        encoder_num_layers: LSTM layers (``lstm`` only).
        encoder_dropout: dropout between LSTM layers.
        placement: ``prefix`` (all before the input) or ``split`` (the paper's ``[P_0:i] x [P_i:N] y``:
            ``num_before`` tokens before the input, the rest after the last ``split_marker``).
        num_before: virtual tokens before the input with ``placement: split``.
        split_marker: text after whose last occurrence the second block goes, e.g. the assistant header
            ``"<|im_start|>assistant\\n"`` so that it sits between prompt and response.
        tokenizer: model spec whose tokenizer tokenizes ``split_marker``; default the base model's own.
    """

    name = "p_tuning"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder: Literal["lstm", "mlp"] = "lstm",
        encoder_hidden_size: int | None = None,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
        placement: Literal["prefix", "split"] = "prefix",
        num_before: int | None = None,
        split_marker: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        _check_num_virtual_tokens(num_virtual_tokens)
        if encoder not in ("lstm", "mlp"):
            raise LitPeftError(f"encoder must be lstm or mlp, got {encoder!r}")
        if encoder_hidden_size is not None and encoder_hidden_size <= 0:
            raise LitPeftError(f"encoder_hidden_size must be positive, got {encoder_hidden_size}")
        if encoder_num_layers <= 0:
            raise LitPeftError(f"encoder_num_layers must be positive, got {encoder_num_layers}")
        if placement not in ("prefix", "split"):
            raise LitPeftError(f"placement must be prefix or split, got {placement!r}")
        if placement == "split":
            if not split_marker:
                raise LitPeftError(
                    "placement='split' needs split_marker (text after which the second block goes)"
                )
            if num_before is None or not 0 <= num_before < num_virtual_tokens:
                raise LitPeftError(
                    f"placement='split' needs num_before in [0, num_virtual_tokens={num_virtual_tokens}), "
                    f"got {num_before}"
                )
        self.num_virtual_tokens, self.encoder = num_virtual_tokens, encoder
        self.encoder_hidden_size, self.encoder_num_layers = encoder_hidden_size, encoder_num_layers
        self.encoder_dropout, self.placement, self.num_before = encoder_dropout, placement, num_before
        self.split_marker, self.tokenizer = split_marker, tokenizer

    def inject(self, model: PreTrainedModel) -> None:
        backbone, hidden, max_positions = _check_model(model, "P-tuning")
        n = self.num_virtual_tokens
        _check_num_virtual_tokens(n, max_positions)
        marker_ids = None
        if self.placement == "split":
            tok = _load_tokenizer(self.tokenizer, model, "placement='split'")
            marker_ids = tok(self.split_marker, add_special_tokens=False)["input_ids"]
            if not marker_ids:
                raise LitPeftError("split_marker tokenizes to no tokens")
        w = backbone.get_input_embeddings().weight
        encoder = PTuningEncoder(
            n,
            hidden,
            max_positions,
            self.encoder,
            self.encoder_hidden_size or hidden,
            self.encoder_num_layers,
            self.encoder_dropout,
            n if self.placement == "prefix" else int(self.num_before or 0),
            marker_ids,
            w.device,
            w.dtype,
        )
        model.add_module("prompt_encoder", encoder)
        encoder.attach(backbone)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only the encoder's output: after training the encoder is not needed (as peft saves it)."""
        encoder, training = model.prompt_encoder, model.prompt_encoder.training
        encoder.eval()  # no LSTM dropout in what is kept
        try:
            # no_grad: one fixed kernel path (the LSTM's differs in the last bits under autograd)
            with torch.no_grad():
                return {"prompt_encoder.prompt_embeddings": encoder.virtual_tokens().detach()}
        finally:
            encoder.train(training)

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        key = "prompt_encoder.prompt_embeddings"
        if set(state) != {key}:
            raise LitPeftError(f"a P-tuning adapter holds exactly '{key}', got {sorted(state)[:3]}")
        expected = (self.num_virtual_tokens, model.get_input_embeddings().weight.shape[1])
        if tuple(state[key].shape) != expected:
            raise LitPeftError(
                f"adapter tensor {key} has shape {tuple(state[key].shape)}, expected {expected}"
            )
        model.prompt_encoder.freeze_output(state[key])

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        raise LitPeftError(
            "P-tuning cannot be merged into the base weights: its virtual tokens are extra inputs"
        )

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft ``P_TUNING`` in inference mode: ``prompt_embeddings`` is the encoder's output."""
        if self.placement != "prefix":
            raise LitPeftError("P-tuning with placement='split' has no peft equivalent (peft only prepends)")
        if "prompt_encoder.prompt_embeddings" in state:
            embeddings = state["prompt_encoder.prompt_embeddings"]
        else:
            embeddings = self.adapter_state_dict(model)["prompt_encoder.prompt_embeddings"]
        config = {"peft_type": "P_TUNING", **_peft_common(model, self.num_virtual_tokens)}
        config |= {
            "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.encoder_hidden_size or config["token_dim"],
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }
        return config, {"prompt_embeddings": embeddings}
