"""What leaves litpeft: a merged plain Hugging Face model, or a Hugging Face ``peft`` adapter directory.

Both are generic over :class:`~litpeft.methods.PeftMethod`: the method folds itself into the base
(:meth:`~litpeft.methods.PeftMethod.merge`) or maps its tensors to peft's names
(:meth:`~litpeft.methods.PeftMethod.to_peft`); this module checks the result and writes it. Whether a
method can be merged or exported is declared by the method (``mergeable``, ``exportable_to_peft``) and
checked before any model is loaded. A directory is written under a temporary name and renamed at the end
(:func:`litpeft.files.atomic_path`), so a failure leaves nothing behind.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from litpeft.errors import LitPeftError
from litpeft.files import atomic_path, check_writable
from litpeft.methods import PeftLayer, PeftMethod
from litpeft.methods.base import refuse, replace_module
from litpeft.quantize import QuantizedLinear, plain_layer

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# What litpeft writes into an output directory: ``--overwrite`` replaces only a directory of these, so it
# never deletes a user's other files.
MERGED_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "vocab.*",
    "merges.txt",
    "adapter",  # the part of a method that cannot be merged (LLaMA-Adapter v2's prompts)
)
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, "README.md")


def check_mergeable(method: PeftMethod) -> None:
    """Fail before any model is loaded when the method declares it cannot be merged (``mergeable``)."""
    refuse(method.merge_refusal())


def check_exportable(method: PeftMethod) -> None:
    """Fail before any model is loaded when the method declares no peft form (``exportable_to_peft``)."""
    refuse(method.peft_refusal())


def merge(model: PreTrainedModel, method: PeftMethod) -> PreTrainedModel:
    """``method.merge(model)``, checked: no method layer is left and the weights are the architecture's own.

    On a quantized base, the layers the method did not adapt are written dequantized as well.

    The second check is what makes the result loadable by ``AutoModelForCausalLM`` without missing or
    unexpected keys: the state dict must have exactly the keys of a fresh model built from its config.
    """
    check_mergeable(method)
    merged = method.merge(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, QuantizedLinear):  # a quantized layer the method left alone: dequantized
            replace_module(merged, name, plain_layer(module, module.weight, module.bias))
    left = sorted({type(m).__name__ for m in merged.modules() if isinstance(m, PeftLayer)})
    if left:
        raise LitPeftError(f"merging '{method.name}' left method layers in the model: {', '.join(left)}")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(merged.config)
    ours, theirs = set(merged.state_dict()), set(plain.state_dict())
    if ours != theirs:
        extra, missing = sorted(ours - theirs), sorted(theirs - ours)
        raise LitPeftError(
            f"merging '{method.name}' did not give a plain {type(plain).__name__}: "
            f"{len(extra)} extra weights (e.g. {extra[:2]}), {len(missing)} missing (e.g. {missing[:2]})"
        )
    merged.requires_grad_(False)
    return merged.eval()


def save_merged(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """A plain HF model directory: safetensors weights, config, generation config, tokenizer, chat template."""

    def write(tmp: Path) -> None:
        target = model.to(dtype) if dtype is not None else model
        target.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_directory(output, write, overwrite, MERGED_FILES)


def to_peft(
    model: PreTrainedModel,
    method: PeftMethod,
    state: dict[str, torch.Tensor],
    base_model_name_or_path: str | None,
    revision: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``method.to_peft`` plus the config fields peft fills in when it saves an adapter itself
    (``revision``: the base's hub revision)."""
    check_exportable(method)
    config, tensors = method.to_peft(model, state)
    config = {
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        **config,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
    }
    if "peft_type" not in config:
        raise LitPeftError(f"method '{method.name}': to_peft() returned a config without 'peft_type'")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return config, tensors


def save_peft(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], output: str | Path, overwrite: bool = False
) -> Path:
    """An HF ``peft`` directory: ``adapter_config.json`` + ``adapter_model.safetensors``."""

    def write(tmp: Path) -> None:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})

    return write_directory(output, write, overwrite, PEFT_FILES)


def check_output_dir(output: str | Path, overwrite: bool, ours: tuple[str, ...] | None = None) -> Path:
    """Refuse an existing non-empty output directory (or a file) unless ``overwrite``; with ``overwrite``,
    refuse one that holds anything but the names in ``ours`` (what litpeft writes there: replacing the
    directory would delete the rest). Checked before any model is loaded; the place must be writable."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LitPeftError(f"--output '{output}' exists and is not a directory")
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if entries and not overwrite:
        raise LitPeftError(
            f"--output '{output}' exists and is not empty (pass --overwrite true to replace it)"
        )
    foreign = [e for e in entries if ours is not None and not any(fnmatch.fnmatch(e, p) for p in ours)]
    if foreign:
        raise LitPeftError(
            f"--output '{output}' holds files litpeft did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); --overwrite replaces only litpeft's own output: "
            "choose another --output or move them"
        )
    check_writable(
        output.absolute().parent, f"--output '{output}': its directory"
    )  # the new copy goes beside it
    return output


def write_directory(
    output: str | Path,
    write: Callable[[Path], None],
    overwrite: bool = False,
    ours: tuple[str, ...] | None = None,
) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``output``, then move it into place in one rename."""
    output = check_output_dir(output, overwrite, ours)
    with atomic_path(output, directory=True) as tmp:
        write(tmp)
    return output
