"""PEFT methods. Each lives in its own file; importing this package registers them by short name."""

from litpeft.methods.base import METHODS, PeftLayer, PeftMethod, adapters_disabled, method_from_config
from litpeft.methods.bottleneck import HoulsbyAdapter
from litpeft.methods.llama_adapter import LlamaAdapter, LlamaAdapterV2
from litpeft.methods.lora import LoRA, LoRALinear
from litpeft.methods.prefix import PrefixTuning, PTuningV2
from litpeft.methods.prompt import PromptTuning, PTuning

__all__ = [
    "METHODS",
    "LlamaAdapter",
    "LlamaAdapterV2",
    "LoRA",
    "LoRALinear",
    "HoulsbyAdapter",
    "PromptTuning",
    "PTuning",
    "PeftLayer",
    "PeftMethod",
    "PrefixTuning",
    "PTuningV2",
    "adapters_disabled",
    "method_from_config",
]
