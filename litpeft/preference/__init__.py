"""Preference tuning: DPO, IPO, ORPO and SimPO for every PEFT method (see docs/preference.md)."""

from litpeft.preference.data import PreferenceDataModule, PreferencePair, PreferenceSource
from litpeft.preference.losses import LOSSES, PairLogps, PairLoss
from litpeft.preference.module import PreferenceLM

__all__ = [
    "LOSSES",
    "PairLogps",
    "PairLoss",
    "PreferenceDataModule",
    "PreferenceLM",
    "PreferencePair",
    "PreferenceSource",
]
