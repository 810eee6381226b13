"""Instruction data: sources, prompt styles, tokenization with prompt masking, packing, the data module."""

from litpeft.data.datamodule import InstructionDataModule, ResumableSampler
from litpeft.data.prompts import STYLES, PromptStyle, get_style
from litpeft.data.sources import (
    Alpaca,
    AutoSource,
    BadRow,
    Chat,
    DataSource,
    HFDataset,
    LoadedData,
    ShareGPT,
)

__all__ = [
    "STYLES",
    "Alpaca",
    "AutoSource",
    "BadRow",
    "Chat",
    "DataSource",
    "HFDataset",
    "InstructionDataModule",
    "LoadedData",
    "PromptStyle",
    "ResumableSampler",
    "ShareGPT",
    "get_style",
]
