"""Reference log-probabilities scored once per dataset and cached (TRL's ``precompute_ref_log_probs``).

With ``precompute_reference: true`` the reference policy (the base, or the ``init_adapter``) scores every
pair of a split once, without gradients, the first time a step of that split runs, and the steps read its
log-probabilities from the cache instead of running a second forward pass. Each batch carries its pairs'
indices in the split (``pair_index``, :class:`~litpeft.preference.data.PairSamples`), so shuffling, batch
sizes and data-parallel sampling cannot pair a row with another row's value; the cache also holds a hash
of the split's tokens, and one restored from a checkpoint is used only if the data hashes the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from litpeft.loss import IGNORE_INDEX
from litpeft.preference.losses import PairLogps


def score_pairs(
    batches: Iterable[dict[str, torch.Tensor]],
    size: int,
    score: Callable[[dict[str, torch.Tensor]], PairLogps],
    device: torch.device,
) -> torch.Tensor:
    """``(size, 2)`` fp32 on the CPU: the chosen and rejected log-probabilities of each pair, by index."""
    out = torch.full((size, 2), float("nan"))
    for batch in batches:
        logps = score({k: v.to(device) for k, v in batch.items()})
        out[batch["pair_index"]] = torch.stack([logps.chosen, logps.rejected], -1).float().cpu()
    return out


class ReferenceCache:
    """Per split (``train``, ``val``): the reference log-probabilities by pair index and the data's hash."""

    def __init__(self) -> None:
        self.logps: dict[str, torch.Tensor] = {}
        self.fingerprints: dict[str, str] = {}

    def has(self, split: str, fingerprint: str) -> bool:
        return self.fingerprints.get(split) == fingerprint

    def store(self, split: str, fingerprint: str, logps: torch.Tensor) -> None:
        self.logps[split], self.fingerprints[split] = logps, fingerprint

    def lookup(self, split: str, batch: dict[str, torch.Tensor]) -> PairLogps:
        """The batch's reference log-probabilities (token counts from its labels, as the policy's)."""
        values = self.logps[split].to(batch["input_ids"].device)[batch["pair_index"]]
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        n = counts.shape[0] // 2
        return PairLogps(values[:, 0], values[:, 1], counts[:n], counts[n:])

    def state_dict(self) -> dict[str, Any]:
        return {s: {"fingerprint": self.fingerprints[s], "logps": self.logps[s]} for s in self.logps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for split, entry in state.items():
            self.store(split, entry["fingerprint"], entry["logps"].float().cpu())
