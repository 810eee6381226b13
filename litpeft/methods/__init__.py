"""PEFT methods. Each lives in its own file; importing this package registers them by short name."""

from litpeft.methods.base import METHODS, PeftLayer, PeftMethod, adapters_disabled, method_from_config
from litpeft.methods.lora import LoRA, LoRALinear

__all__ = [
    "METHODS",
    "LoRA",
    "LoRALinear",
    "PeftLayer",
    "PeftMethod",
    "adapters_disabled",
    "method_from_config",
]
