"""Instruction data: sources, prompt styles, tokenization with prompt masking, the data module."""

from litpeft.data.datamodule import InstructionDataModule
from litpeft.data.prompts import STYLES, PromptStyle, get_style

__all__ = ["STYLES", "InstructionDataModule", "PromptStyle", "get_style"]
