"""What the benchmark compares, with which hyperparameters, and the speed changes it can switch off."""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from litpeft.speedups import Speedups, speedups_off, switch_off  # noqa: E402,F401  (after the checkout is on the path; re-exported)

SEED = 42
BATCH_SIZE = 8
LR = 2e-4

# name: (litpeft method config, peft config factory name or None). Hyperparameters follow each paper's
# common setting; both sides get the same numbers.
METHODS: dict[str, dict[str, Any]] = {
    "lora": {  # dropout 0: both libraries' default
        "litpeft": {"class_path": "lora", "init_args": {"r": 16, "alpha": 32}},
        "peft": ("LoraConfig", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
    },
    "lora_dropout": {  # configs/lora.yaml's dropout 0.05: a random mask per adapted layer and step
        "litpeft": {"class_path": "lora", "init_args": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "peft": (
            "LoraConfig",
            {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        ),
    },
    "prompt_tuning": {
        "litpeft": {"class_path": "prompt_tuning", "init_args": {"num_virtual_tokens": 20}},
        "peft": ("PromptTuningConfig", {"num_virtual_tokens": 20}),
        "virtual_tokens": 20,
    },
    "p_tuning": {
        "litpeft": {"class_path": "p_tuning", "init_args": {"num_virtual_tokens": 20, "encoder": "mlp"}},
        "peft": ("PromptEncoderConfig", {"num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP"}),
        "virtual_tokens": 20,
    },
    "prefix_tuning": {
        "litpeft": {"class_path": "prefix_tuning", "init_args": {"num_virtual_tokens": 20}},
        "peft": ("PrefixTuningConfig", {"num_virtual_tokens": 20, "prefix_projection": True}),
        "virtual_keys": 20,
    },
    "p_tuning_v2": {
        "litpeft": {"class_path": "p_tuning_v2", "init_args": {"num_virtual_tokens": 20}},
        "peft": ("PrefixTuningConfig", {"num_virtual_tokens": 20, "prefix_projection": False}),
        "virtual_keys": 20,
    },
    "llama_adapter": {
        "litpeft": {"class_path": "llama_adapter", "init_args": {"adapter_len": 10}},
        "peft": ("AdaptionPromptConfig", {"adapter_len": 10, "adapter_layers": 30}),
        "virtual_keys": 10,
    },
    "llama_adapter_v2": {
        "litpeft": {"class_path": "llama_adapter_v2", "init_args": {"adapter_len": 10}},
        "peft": None,
        "virtual_keys": 10,
    },
    "houlsby": {
        "litpeft": {"class_path": "houlsby", "init_args": {"bottleneck_size": 64}},
        "peft": None,
    },
    # the later methods at their shipped configs' settings (peft's defaults where the configs take them)
    "ia3": {"litpeft": {"class_path": "ia3"}, "peft": ("IA3Config", {})},
    "ln_tuning": {"litpeft": {"class_path": "ln_tuning"}, "peft": ("LNTuningConfig", {})},
    "bitfit": {"litpeft": {"class_path": "bitfit", "init_args": {"add_missing_biases": True}}, "peft": None},
    "vera": {
        "litpeft": {"class_path": "vera", "init_args": {"r": 256}},
        "peft": ("VeraConfig", {"r": 256, "target_modules": "all-linear"}),
    },
    "loha": {
        "litpeft": {"class_path": "loha", "init_args": {"r": 8, "alpha": 8.0}},
        "peft": ("LoHaConfig", {"r": 8, "alpha": 8, "target_modules": "all-linear"}),
    },
    "lokr": {
        "litpeft": {"class_path": "lokr", "init_args": {"r": 8, "alpha": 8.0}},
        "peft": ("LoKrConfig", {"r": 8, "alpha": 8, "target_modules": "all-linear"}),
    },
    "oft": {
        "litpeft": {"class_path": "oft", "init_args": {"oft_block_size": 32, "r": 0}},
        "peft": ("OFTConfig", {"oft_block_size": 32, "r": 0, "target_modules": "all-linear"}),
    },
    "adalora": {  # the allocator's masking is not part of a step's time on either side
        "litpeft": {"class_path": "adalora", "init_args": {"init_r": 12, "target_r": 8, "total_step": 1000}},
        "peft": (
            "AdaLoraConfig",
            {
                "init_r": 12,
                "target_r": 8,
                "lora_alpha": 8,
                "total_step": 1000,
                "target_modules": "all-linear",
            },
        ),
    },
}

# A config-built Llama of about 0.5B parameters with random weights: a larger shape than SmolLM2-135M.
LARGE_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
SMOLLM2 = "smollm2-135m-instruct"

#: litpeft's measured speed changes, each a switch of :data:`litpeft.speedups.SPEEDUPS` read on the real
#: code path; an ablation row or ``ab_speed.py`` turns some off.
SPEED_CHANGES: list[str] = Speedups.names()


def method_available(name: str) -> str | None:
    """``None`` if litpeft in this checkout has the method, else why not."""
    import pkgutil

    import litpeft.methods as pkg
    from litpeft.methods import METHODS as REGISTRY

    with warnings.catch_warnings():  # the moved modules' aliases (litpeft.methods.adapter) warn on import
        warnings.simplefilter("ignore", FutureWarning)
        for info in pkgutil.iter_modules(pkg.__path__):
            with contextlib.suppress(Exception):
                importlib.import_module(f"litpeft.methods.{info.name}")
    short = METHODS[name]["litpeft"]["class_path"]
    return None if short in REGISTRY else "not available in this checkout"
