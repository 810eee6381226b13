"""The next-token objective on answer tokens, shared by training (``PeftLM``) and ``litpeft evaluate``.

A label of ``IGNORE_INDEX`` (the prompt, padding) carries no loss. The LM head runs only at positions
whose next token carries loss: instruction data masks most tokens, and the head is a large share of a
small model's FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

IGNORE_INDEX = -100


def answer_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` at the positions whose next token is a loss target, ``(n, vocab)`` and ``(n,)``.

    The whole model is called (not its backbone) so that FSDP's root unit gathers the embedding and head;
    it computes no logits itself (``logits_to_keep`` is empty). A packed batch carries ``position_ids``
    restarting at each sample. Methods that add virtual positions remove them from the hidden states, so
    positions here are the batch's own. A model family's final-logit soft-capping (Gemma 2,
    ``tanh(z / c) * c``) is applied as its own forward would.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=labels.device),
        output_hidden_states=[-1],
    ).hidden_states[-1][:, :-1]
    logits = model.get_output_embeddings()(hidden[keep])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, labels[keep]


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy (in fp32) and the number of correctly predicted tokens, as tensors."""
    loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct
