"""P-tuning v2 (Liu et al. 2022, arXiv 2110.07602): deep prompt tuning.

Every layer gets ``N`` trainable prompt vectors as keys/values (sec. 3.2, "prompts in different layers are
added as prefix tokens"), trained directly: no reparameterization by default (sec. 3.3 found it helps on
some tasks only). The mechanism is prefix tuning's (:class:`~litpeft.methods.prefix.PrefixTuning`:
positions, attention, saving, export to peft's ``PrefixTuningConfig`` without projection); this file holds
the method's own defaults.
"""

from __future__ import annotations

from litpeft.methods.prefix import PrefixTuning


class PTuningV2(PrefixTuning):
    """P-tuning v2: deep prompts, trainable key/value prefixes on every layer, no reparameterization.

    Args:
        num_virtual_tokens: prompt length ``N`` per layer.
        prefix_projection: train through prefix tuning's MLP instead (the paper's optional
            reparameterization, useful on some tasks, sec. 3.3).
        encoder_hidden_size: MLP width when ``prefix_projection``; ``None``: ``kv_dim``.
        embedding_dim: embedding width when ``prefix_projection``; ``None``: ``kv_dim``.
        prefix_dropout: dropout on the prompt keys/values in training.
        init_text: start the prompts at the frozen model's own keys/values of this text (see
            :class:`PrefixTuning`); ``None``: standard normal.
        tokenizer: model spec whose tokenizer tokenizes ``init_text``; default the base model's own.
    """

    name = "p_tuning_v2"
    learning_rate = 5e-3  # configs/p_tuning_v2.yaml (direct prompts, init_text)

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        embedding_dim: int | None = None,
        prefix_dropout: float = 0.0,
        init_text: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__(
            num_virtual_tokens,
            prefix_projection,
            encoder_hidden_size,
            embedding_dim,
            prefix_dropout,
            init_text,
            tokenizer,
        )
