"""The pairwise preference objectives, on per-sequence log-probabilities of the chosen and rejected answers.

Each loss takes the policy's summed answer log-probabilities (and, for DPO and IPO, the reference's) and
returns per-pair losses and the implicit rewards that are logged. The formulas are the papers'; where TRL
(the test oracle) fixed a convention the paper leaves open, litpeft takes TRL's (IPO's length
normalisation, ORPO's average log-probabilities), so the numbers are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

#: The losses :class:`~litpeft.preference.PreferenceLM` offers.
LossType = Literal["dpo", "ipo", "orpo", "simpo"]
LOSSES: tuple[str, ...] = ("dpo", "ipo", "orpo", "simpo")
#: Losses whose reference is the policy without the adapter (or the starting adapter).
NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass
class PairLogps:
    """Summed answer log-probabilities and answer lengths in tokens, per pair (each ``(B,)``)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token averages (a pair's answer always has at least one token; clamped all the same)."""
        return (
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
        )


@dataclass
class PairLoss:
    """Per-pair losses and implicit rewards; ``extra`` holds loss-specific scalars to log."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) log s(z) - e log s(-z)``: the logistic loss with labels flipped with probability ``e``
    (conservative DPO, Mitchell 2023; ``e = 0`` is the plain Bradley-Terry log-likelihood)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo(policy: PairLogps, reference: PairLogps, beta: float, label_smoothing: float = 0.0) -> PairLoss:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): ``-log s(b (log pi/ref)(y_w) - b (log pi/ref)(y_l))``,
    with label smoothing. Rewards ``b log pi(y)/ref(y)``."""
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    losses = smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo(policy: PairLogps, reference: PairLogps, beta: float) -> PairLoss:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): ``(h - 1 / (2 b))^2`` with ``h`` the difference of
    the chosen and rejected log-ratios, each averaged over its answer tokens (as TRL, whose authors
    confirmed it with the paper's). Rewards as DPO's."""
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    h = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
    return PairLoss((h - 1 / (2 * beta)) ** 2, beta * chosen.detach(), beta * rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(policy: PairLogps, beta: float) -> PairLoss:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv 2403.07691, eqs. 4-7): ``-b log s(log odds(y_w) -
    log odds(y_l))`` with ``odds(y) = P(y) / (1 - P(y))`` and ``log P`` the mean answer log-probability.
    The SFT term (eq. 6) is added by the module. Rewards ``b * mean log P(y)``; ``extra`` holds the
    mean log-sigmoid (``log_odds_ratio``) and the mean log odds ratio (``log_odds_chosen``), TRL's names."""
    chosen, rejected = (x.float() for x in policy.means())
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return PairLoss(
        -beta * ratio,
        beta * chosen.detach(),
        beta * rejected.detach(),
        {"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()},
    )


def simpo(policy: PairLogps, beta: float, gamma: float, label_smoothing: float = 0.0) -> PairLoss:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): ``-log s(b/|y_w| log pi(y_w) - b/|y_l| log pi(y_l) -
    g)``, reference-free and length-normalised, with label smoothing. Rewards ``b * mean log pi(y)``."""
    chosen, rejected = policy.means()
    losses = smoothed_sigmoid_loss(beta * (chosen - rejected) - gamma, label_smoothing)
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())
