"""litpeft: parameter-efficient fine-tuning of Hugging Face causal LMs on PyTorch Lightning."""

from litpeft.data import InstructionDataModule
from litpeft.methods import METHODS, LoRA, PeftMethod
from litpeft.module import PeftLM

__version__ = "0.1.0"
__all__ = ["METHODS", "InstructionDataModule", "LoRA", "PeftLM", "PeftMethod", "__version__"]
