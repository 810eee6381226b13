"""PEFT methods. Each lives in its own file; importing this package registers them by short name.

Adding a method is one file (a :class:`PeftMethod` subclass with a ``name``) and one import line here.
Shared mechanisms: ``base`` (the interface), ``layout`` (where things are in a model, attaching state),
``attention`` (the attention function and its slots), ``virtual_tokens`` (soft prompts at the input).
"""

from litpeft.methods.adalora import AdaLoRA, SVDLinear
from litpeft.methods.base import METHODS, PeftLayer, PeftMethod, adapters_disabled, method_from_config
from litpeft.methods.bitfit import BitFit
from litpeft.methods.bottleneck import HoulsbyAdapter
from litpeft.methods.ia3 import IA3, IA3Linear
from litpeft.methods.llama_adapter import LlamaAdapter, LlamaAdapterV2
from litpeft.methods.ln_tuning import LNTuning
from litpeft.methods.loha import LoHa, LoHaLinear
from litpeft.methods.lokr import LoKr, LoKrLinear
from litpeft.methods.lora import LoRA, LoRALinear
from litpeft.methods.oft import OFT, OFTLinear
from litpeft.methods.p_tuning_v2 import PTuningV2
from litpeft.methods.prefix import PrefixTuning
from litpeft.methods.prompt import PromptTuning, PTuning
from litpeft.methods.vera import VeRA, VeRALinear

__all__ = [
    "METHODS",
    "AdaLoRA",
    "BitFit",
    "LlamaAdapter",
    "LlamaAdapterV2",
    "LNTuning",
    "LoHa",
    "LoHaLinear",
    "LoKr",
    "LoKrLinear",
    "LoRA",
    "LoRALinear",
    "HoulsbyAdapter",
    "IA3",
    "IA3Linear",
    "OFT",
    "OFTLinear",
    "PromptTuning",
    "PTuning",
    "PeftLayer",
    "PeftMethod",
    "PrefixTuning",
    "PTuningV2",
    "SVDLinear",
    "VeRA",
    "VeRALinear",
    "adapters_disabled",
    "method_from_config",
]
