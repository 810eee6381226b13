"""Adapter directories (the trained artifact, not a method): what ``fit`` leaves behind and every later command loads.

adapter.safetensors   the method's trained tensors (never a pickle)
adapter.yaml          base model spec (a hub id pinned to its commit: org/name@<sha>) and fingerprint,
                      method (class_path + init_args), prompt style
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from litpeft.data.prompts import PromptStyle, get_style, style_name
from litpeft.errors import LitPeftError
from litpeft.files import write_atomic
from litpeft.methods import PeftMethod, method_from_config
from litpeft.models import load_model, load_tokenizer, pinned_spec
from litpeft.quantize import quantize_model

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.yaml"


FINGERPRINT_ELEMENTS = 65536


def base_fingerprint(model: PreTrainedModel, embedding: torch.Tensor | None = None) -> str:
    """A short hash of the base model's input embedding: tells one base checkpoint from another.

    ``embedding``: the table's leading rows when the model's own is sharded (see litpeft.distributed).
    """
    weight = model.get_input_embeddings().weight
    emb = weight.detach() if embedding is None else embedding
    sample = emb.flatten()[:FINGERPRINT_ELEMENTS].float().cpu().numpy().tobytes()
    return f"{model.config.model_type}-{tuple(weight.shape)}-" + hashlib.sha256(sample).hexdigest()[:12]


def base_fingerprints(model: PreTrainedModel) -> set[str]:
    """The fingerprints ``model``'s base may have been trained under: its table as it is, and rounded to
    bf16 and fp16 (an fp32 checkpoint trained under bf16-true held a bf16 table; one loaded now in fp32
    or served in bf16 is the same base)."""
    emb = model.get_input_embeddings().weight.detach().flatten()[:FINGERPRINT_ELEMENTS]
    return {base_fingerprint(model)} | {
        base_fingerprint(model, embedding=emb.to(dtype)) for dtype in (torch.bfloat16, torch.float16)
    }


def save_adapter(
    directory: str | Path,
    module: Any,
    style: PromptStyle | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
) -> Path:
    """Write a ``PeftLM``'s adapter (its method's tensors and config) to ``directory``.

    ``tensors``/``fingerprint``: already gathered full tensors when the model is sharded (FSDP).
    """
    if tensors is None:
        tensors = module.method.adapter_state_dict(module.model)
    return write_adapter(
        directory,
        module.model_spec,
        module.model,
        module.method,
        tensors,
        style,
        fingerprint=fingerprint,
        quantize=getattr(module, "quantize", None),
    )


def write_adapter(
    directory: str | Path,
    base_spec: str,
    model: PreTrainedModel,
    method: PeftMethod,
    tensors: dict[str, torch.Tensor],
    style: PromptStyle | None = None,
    fingerprint: str | None = None,
    quantize: str | None = None,
) -> Path:
    """Write ``tensors`` of ``method`` as an adapter of the base ``base_spec`` (``model`` is that base)."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    weights = save(tensors, metadata={"format": "pt"})
    write_atomic(directory / WEIGHTS, lambda f: f.write(weights), what="adapter weights")
    meta = {
        "base_model": pinned_spec(base_spec),
        "base_fingerprint": fingerprint or base_fingerprint(model),
        "method": method.config(),
        "prompt_style": style_name(style) if style is not None else None,
        "quantize": quantize,
        "trainable_parameters": sum(v.numel() for v in tensors.values()),
    }
    text = yaml.safe_dump(meta, sort_keys=False).encode()
    write_atomic(directory / CONFIG, lambda f: f.write(text), what="adapter config")
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise LitPeftError(f"adapter directory '{directory}' does not exist")
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise LitPeftError(f"'{directory}' is not a litpeft adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        return yaml.safe_load((directory / CONFIG).read_text())
    except yaml.YAMLError as e:
        raise LitPeftError(f"{directory / CONFIG}: malformed YAML ({e})") from None


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LitPeftError(f"{path}: corrupted or unreadable adapter weights ({e})") from None


def load_adapter(
    directory: str | Path,
    model: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PeftMethod, PromptStyle]:
    """Base model + trained adapter from an adapter directory, ready for ``generate``/``merge``/``export``.

    ``model`` overrides the saved base spec (e.g. the same base at another path); a base whose
    fingerprint differs from the one the adapter was trained on is refused unless ``allow_other_base``.
    """
    meta = read_adapter_config(directory)
    weights = read_adapter_weights(directory)  # read before the (slow) base model: fail fast
    spec = model or meta["base_model"]
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    base = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    if (
        not allow_other_base
        and meta.get("base_fingerprint")
        and meta["base_fingerprint"] not in base_fingerprints(base)
    ):
        raise LitPeftError(
            f"adapter '{directory}' was trained on base '{meta['base_model']}', which differs from "
            f"'{spec}' (fingerprint {meta['base_fingerprint']} vs {base_fingerprint(base)}); "
            "--allow_other_base true uses it anyway"
        )
    if meta.get("quantize"):
        log.info(
            "adapter trained on a %s-quantized base: quantizing the base the same way (merging then writes "
            "dequantized 16/32-bit weights, not a quantized model)",
            meta["quantize"],
        )
        quantize_model(base, meta["quantize"])
    method = method_from_config(meta["method"])
    method.apply(base, saved=weights)
    method.load_adapter_state_dict(base, weights)
    base.eval()
    style = get_style(meta.get("prompt_style") or "auto", tokenizer)
    return base, tokenizer, method, style
