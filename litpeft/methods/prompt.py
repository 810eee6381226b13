"""Soft prompts at the input: prompt tuning and P-tuning.

Prompt tuning (Lester et al. 2021, arXiv 2104.08691) learns ``N`` virtual token embeddings ``P`` and feeds
``[P; E(x)]`` to the frozen model (section 2). P-tuning (Liu et al. 2021, arXiv 2103.10385) produces the
virtual tokens with a prompt encoder, ``P = MLP(BiLSTM(e))`` over trainable inputs ``e`` (section 3.2), and
places them by a template, ``[P_0:i] x [P_i+1:j] y ...``: blocks of virtual tokens and anchor tokens
interleaved with the parts of the prompt style's text.

Both insert their virtual tokens through one mechanism, :class:`~litpeft.methods.virtual_tokens.VirtualTokens`
(hooks on the decoder backbone; see :mod:`litpeft.methods.virtual_tokens` for the layout, positions and
the KV cache). Its module is attached to the model as ``prompt_encoder`` (the saved keys' prefix).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftMethod, _is_int, check_arg, refuse
from litpeft.methods.layout import attach, attached, decoder_backbone, hidden_size, max_positions, text_config
from litpeft.methods.template import Block, PromptBlock, check_template
from litpeft.methods.virtual_tokens import PromptEmbedding, PTuningEncoder
from litpeft.models import load_tokenizer

ENCODER = "prompt_encoder"  # slot of the model that holds the VirtualTokens (its saved key prefix)


def _check_model(model: PreTrainedModel, method: str) -> tuple[nn.Module, int, int]:
    """The decoder backbone, hidden size and context length, or a clear refusal."""
    return decoder_backbone(model, method), hidden_size(model), max_positions(model)


def _load_tokenizer(spec: str | None, model: PreTrainedModel, option: str) -> Any:
    spec = spec or getattr(model, "name_or_path", "") or None
    if not spec:
        raise LitPeftError(f"{option} needs a tokenizer: set `tokenizer` (a model spec, e.g. tiny:llama)")
    return load_tokenizer(spec)


def _check_num_virtual_tokens(n: int, max_positions: int | None = None) -> None:
    check_arg(_is_int(n) and n > 0, "num_virtual_tokens", n, "a positive integer")
    if max_positions is not None and n >= max_positions:
        raise LitPeftError(
            f"num_virtual_tokens={n} leaves no room for input in the model's context of {max_positions}"
        )


def _peft_common(model: PreTrainedModel, n: int) -> dict[str, Any]:
    config = text_config(model)
    return {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": n,
        "token_dim": hidden_size(model),
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
    learning_rate = 3e-2  # configs/prompt_tuning.yaml: soft prompts want a much larger LR
    exportable_to_peft = True
    not_mergeable_reason = (
        "prompt tuning cannot be merged into the base weights: its virtual tokens are extra inputs"
    )

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: Literal["random", "vocab", "text"] = "random",
        init_text: str | None = None,
        tokenizer: str | None = None,
        init_range: float = 0.5,
    ) -> None:
        _check_num_virtual_tokens(num_virtual_tokens)
        check_arg(init in ("random", "vocab", "text"), "init", init, "one of: random, vocab, text")
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
        attach(model, ENCODER, PromptEmbedding(n, hidden, max_positions, weight)).hook_into(backbone)

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
        return config, {"prompt_embeddings": state[f"{ENCODER}.embedding.weight"]}


class PTuning(PeftMethod):
    r"""P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder.

    The encoder (one for all the virtual tokens, as the paper's) maps ``N`` trainable inputs to the
    ``N`` virtual tokens; ``placement`` says where they go:

    - ``prefix``: all before the input (peft's P-tuning).
    - ``split``: ``num_before`` before the input, the rest after the last ``split_marker`` (the paper's
      ``[P_0:i] x [P_i:N] y``).
    - ``template``: the paper's template in full, ``[P_0:i] x [P_i+1:j] y ...`` with anchors: a list of
      blocks (:class:`~litpeft.methods.template.PromptBlock`), each ``tokens`` virtual tokens and an
      optional ``anchor`` text (real tokens, e.g. the paper's ``"?"`` on RTE) at the sample's start or
      ``after``/``before`` a text of the prompt style, e.g. for the Alpaca style::

          template:
            - {tokens: 4}                                  # before the sample
            - {tokens: 4, after: "### Instruction:\n"}     # before the instruction x
            - {tokens: 4, anchor: "?", before: "\n\n### Response:\n"}   # after it, then an anchor
            - {tokens: 4, after: "### Response:\n"}        # before the response y

      A text goes through the tokenizer alone, so it must tokenize the same inside the prompt (end it at
      a segment border such as a newline or a special token).

    The virtual tokens go before every sample of a packed row, with positions restarting per sample.

    Args:
        num_virtual_tokens: number of virtual tokens ``N`` (with a template: the sum of its ``tokens``).
        encoder: ``lstm`` (bidirectional LSTM + 2-layer MLP, as the paper) or ``mlp`` (3-layer MLP).
        encoder_hidden_size: hidden size ``H`` of the encoder; default the model's hidden size.
        encoder_num_layers: LSTM layers (``lstm`` only).
        encoder_dropout: dropout between LSTM layers.
        placement: ``prefix``, ``split`` or ``template`` (above).
        num_before: virtual tokens before the input with ``placement: split``.
        split_marker: text after whose last occurrence the second block goes, e.g. the assistant header
            ``"<|im_start|>assistant\n"`` so that it sits between prompt and response.
        template: the blocks of ``placement: template``.
        tokenizer: model spec whose tokenizer tokenizes the texts; default the base model's own.
    """

    name = "p_tuning"
    learning_rate = 5e-4  # configs/p_tuning.yaml (1e-3 stalled on some initial draws)
    exportable_to_peft = True  # with placement: prefix (peft_refusal)
    not_mergeable_reason = (
        "P-tuning cannot be merged into the base weights: its virtual tokens are extra inputs"
    )

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder: Literal["lstm", "mlp"] = "lstm",
        encoder_hidden_size: int | None = None,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
        placement: Literal["prefix", "split", "template"] = "prefix",
        num_before: int | None = None,
        split_marker: str | None = None,
        template: list[PromptBlock] | None = None,
        tokenizer: str | None = None,
    ) -> None:
        _check_num_virtual_tokens(num_virtual_tokens)
        check_arg(encoder in ("lstm", "mlp"), "encoder", encoder, "one of: lstm, mlp")
        check_arg(
            encoder_hidden_size is None or encoder_hidden_size > 0,
            "encoder_hidden_size",
            encoder_hidden_size,
            "a positive integer (or null: the model's hidden size)",
        )
        check_arg(encoder_num_layers > 0, "encoder_num_layers", encoder_num_layers, "a positive integer")
        check_arg(
            placement in ("prefix", "split", "template"),
            "placement",
            placement,
            "one of: prefix, split, template",
        )
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
        if placement == "template":
            check_template(template or [], num_virtual_tokens)
            template = [dict(block) for block in template or []]  # plain dicts: saved as YAML as they are
        elif template:
            raise LitPeftError(f"template is used with placement='template' only, not {placement!r}")
        self.num_virtual_tokens, self.encoder = num_virtual_tokens, encoder
        self.encoder_hidden_size, self.encoder_num_layers = encoder_hidden_size, encoder_num_layers
        self.encoder_dropout, self.placement, self.num_before = encoder_dropout, placement, num_before
        self.split_marker, self.template, self.tokenizer = split_marker, template, tokenizer

    def blocks(self, model: PreTrainedModel) -> tuple[list[Block], list[int]]:
        """The placement as tokenized blocks, and the anchors' token ids."""
        n = self.num_virtual_tokens
        if self.placement == "prefix":
            return [Block((0, n))], []
        tok = _load_tokenizer(self.tokenizer, model, f"placement='{self.placement}'")

        def ids(text: str, what: str) -> tuple[int, ...]:
            out = tuple(tok(text, add_special_tokens=False)["input_ids"])
            if not out:
                raise LitPeftError(f"{what} tokenizes to no tokens")
            return out

        if self.placement == "split":
            n0 = int(self.num_before or 0)
            marker = ids(self.split_marker or "", "split_marker")
            second = Block((n0, n), marker=marker, occurrence="last", label="split_marker")
            return ([Block((0, n0))] if n0 else []) + [second], []
        blocks, anchors, at = [], [], 0
        for i, b in enumerate(self.template or []):
            text = b.get("after") if b.get("after") is not None else b.get("before")
            label = f"template block {i} ({'after' if b.get('after') is not None else 'before'} {text!r})"
            marker = ids(text, label) if text is not None else ()
            anchor = list(ids(b["anchor"], f"template block {i}'s anchor")) if b.get("anchor") else []
            tokens = b.get("tokens", 0)
            blocks.append(
                Block(
                    (at, at + tokens),
                    (len(anchors), len(anchors) + len(anchor)),
                    marker,
                    after=b.get("after") is not None,
                    occurrence=b.get("occurrence", "every"),
                    required=b.get("required", True),
                    label=label,
                )
            )
            anchors += anchor
            at += tokens
        return blocks, anchors

    def inject(self, model: PreTrainedModel) -> None:
        backbone, hidden, max_positions = _check_model(model, "P-tuning")
        n = self.num_virtual_tokens
        _check_num_virtual_tokens(n, max_positions)
        blocks, anchors = self.blocks(model)
        w = backbone.get_input_embeddings().weight
        encoder = PTuningEncoder(
            n,
            hidden,
            max_positions,
            self.encoder,
            self.encoder_hidden_size or hidden,
            self.encoder_num_layers,
            self.encoder_dropout,
            blocks,
            anchors,
            w.device,
        )
        attach(model, ENCODER, encoder).hook_into(backbone)

    def peft_refusal(self) -> str | None:
        if self.placement != "prefix":
            return (
                f"P-tuning with placement='{self.placement}' has no peft equivalent "
                "(peft's P-tuning only prepends its virtual tokens)"
            )
        return super().peft_refusal()

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only the encoder's output: after training the encoder is not needed (as peft saves it)."""
        encoder = attached(model, ENCODER)
        training = encoder.training
        encoder.eval()  # no LSTM dropout in what is kept
        try:
            # no_grad: one fixed kernel path (the LSTM's differs in the last bits under autograd)
            with torch.no_grad():
                return {f"{ENCODER}.prompt_embeddings": encoder.virtual_tokens().detach()}
        finally:
            encoder.train(training)

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        key = f"{ENCODER}.prompt_embeddings"
        if set(state) != {key}:
            raise LitPeftError(f"a P-tuning adapter holds exactly '{key}', got {sorted(state)[:3]}")
        expected = (self.num_virtual_tokens, model.get_input_embeddings().weight.shape[1])
        if tuple(state[key].shape) != expected:
            raise LitPeftError(
                f"adapter tensor {key} has shape {tuple(state[key].shape)}, expected {expected}"
            )
        attached(model, ENCODER).freeze_output(state[key])

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft ``P_TUNING`` in inference mode: ``prompt_embeddings`` is the encoder's output."""
        refuse(self.peft_refusal())
        key = f"{ENCODER}.prompt_embeddings"
        embeddings = state[key] if key in state else self.adapter_state_dict(model)[key]
        config = {"peft_type": "P_TUNING", **_peft_common(model, self.num_virtual_tokens)}
        config |= {
            "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.encoder_hidden_size or config["token_dim"],
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }
        return config, {"prompt_embeddings": embeddings}
