"""Checks a ``litpeft fit`` runs before the Trainer starts, so that bad input fails before anything is written.

Lightning creates the run directory (the logger's ``version_N/``, ``config.yaml``) before it loads the model,
restores a checkpoint or builds the optimizer. Each of these can fail on ordinary bad input (a truncated
weights file, ``target_modules`` that match nothing, a garbage ``--ckpt_path``, ``lr: -1``), so they are
tried here first, cheaply: the model is built on the meta device (no weights read), the checkpoint is read
with ``weights_only=True``, the optimizer and scheduler are built over one dummy tensor.
"""

from __future__ import annotations

import copy
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import instantiate_class

from litpeft.errors import InvalidArgument, LitPeftError
from litpeft.files import check_writable
from litpeft.models import check_weights

log = logging.getLogger(__name__)

# Lightning's names for checkpoints it finds itself (resolved by the Trainer, not paths).
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# torch's optimizers name an argument in their messages by these words.
_OPTIMIZER_WORDS = {"learning rate": "lr", "epsilon": "eps", "beta": "betas", "momentum": "momentum"}


def check_outputs(trainer: Trainer, model: LightningModule) -> None:
    """The run directory, the adapter directory and each checkpoint directory can be written."""
    check_writable(trainer.default_root_dir, "trainer.default_root_dir")
    if trainer.accumulate_grad_batches < 1:
        raise LitPeftError(
            f"trainer.accumulate_grad_batches: {trainer.accumulate_grad_batches} is not allowed; a positive integer"
        )
    adapter_dir = getattr(model, "adapter_dir", None)
    if adapter_dir:
        check_writable(adapter_dir, "model.adapter_dir")
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            check_writable(callback.dirpath, "ModelCheckpoint dirpath")


def check_checkpoint(ckpt_path: Any) -> dict[str, Any] | None:
    """An explicit ``--ckpt_path`` is a readable Lightning checkpoint; returns it (``None`` for keywords)."""
    if ckpt_path is None or str(ckpt_path) in CKPT_KEYWORDS:
        return None
    path = Path(str(ckpt_path))
    if not path.exists():
        raise LitPeftError(f"--ckpt_path '{ckpt_path}' does not exist")
    if path.is_dir():  # a sharded (FSDP) checkpoint is a directory: its strategy reads and checks it
        if (path / "meta.pt").is_file() or (path / ".metadata").is_file():
            return None
        raise LitPeftError(
            f"--ckpt_path '{ckpt_path}' is a directory but not a sharded checkpoint "
            "(give a .ckpt file, or the directory of a sharded FSDP checkpoint)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises several kinds (pickle, zip, EOF, runtime)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Weights only load failed" in first:  # torch's advice there (weights_only=False) is unsafe
            first = "not a torch checkpoint, or one holding objects other than tensors"
        raise LitPeftError(
            f"--ckpt_path '{ckpt_path}' is not a readable checkpoint ({first[:200]})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise LitPeftError(f"--ckpt_path '{ckpt_path}' is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def check_model(model: LightningModule, checkpoint: dict[str, Any] | None, ckpt_path: Any) -> None:
    """Weights files intact; the method applied to the base built on the meta device; the checkpoint's
    tensors are the ones this method trains."""
    spec = getattr(model, "model_spec", None)
    if (
        not isinstance(spec, str)
        or not hasattr(model, "build_model")
        or getattr(model, "model", 1) is not None
    ):
        return
    check_weights(spec)
    method, quantize = model.method, model.quantize
    model.method, model.quantize = copy.deepcopy(method), None  # the dry run must not touch the real ones
    try:
        built = model.build_model(meta=True)
    except LitPeftError:
        raise
    except Exception as e:  # not every method can be tried on the meta device: the real run decides
        log.debug("meta build skipped: %s", e)
        return
    finally:
        model.method, model.quantize = method, quantize
    if checkpoint is not None:
        trainable = {f"model.{n}": tuple(p.shape) for n, p in built.named_parameters() if p.requires_grad}
        saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}
        if saved != trainable:
            differ = sorted(set(saved) ^ set(trainable)) or sorted(
                k for k in saved if saved[k] != trainable[k]
            )
            raise LitPeftError(
                f"--ckpt_path '{ckpt_path}' was not written by this model and method: its tensors differ "
                f"(e.g. {differ[0]}); resume with the config that wrote it"
            )


def _offending_key(init_args: dict[str, Any], message: str) -> str | None:
    lowered = message.lower()
    for words, key in _OPTIMIZER_WORDS.items():
        if words in lowered and key in init_args:
            return key
    for key, value in init_args.items():
        if key in message or (
            value is not None and re.search(rf"(?<![\w.]){re.escape(str(value))}\b", message)
        ):
            return key
    return None


def _build(name: str, target: Any, init: dict[str, Any]) -> Any:
    """``instantiate_class(target, init)``; a refusal becomes one line naming ``<name>.init_args.<key>``."""
    args = dict(init.get("init_args") or {})
    try:
        return instantiate_class(target, init)
    except InvalidArgument as e:
        raise (e.under(f"{name}.init_args.") if e.scope else e) from None
    except LitPeftError:
        raise
    except (ValueError, TypeError) as e:
        cls = init.get("class_path", "?").rsplit(".", 1)[-1]
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key = _offending_key(args, message)
        if key is None:
            raise LitPeftError(f"{name}.init_args: {cls} refuses its arguments: {message}") from None
        raise LitPeftError(
            f"{name}.init_args.{key}: {args[key]!r} is not allowed; {cls} says: {message}"
        ) from None


def check_optimizer(optimizer_init: dict[str, Any] | None, scheduler_init: dict[str, Any] | None) -> None:
    """The optimizer and the LR scheduler accept their arguments (built over one dummy tensor)."""
    if not optimizer_init:
        return
    optimizer = _build("optimizer", [torch.nn.Parameter(torch.zeros(1))], optimizer_init)
    if scheduler_init:
        args = scheduler_init.get("init_args") or {}
        if "total_steps" in args and args["total_steps"] is None:  # the trainer's, later
            scheduler_init = {**scheduler_init, "init_args": {**args, "total_steps": 1000}}
        _build("lr_scheduler", optimizer, scheduler_init)


def check_fit(trainer: Trainer, model: LightningModule, ckpt_path: Any) -> None:
    """Everything a fit would otherwise find out after it created its run directory."""
    check_outputs(trainer, model)
    check_optimizer(getattr(model, "optimizer_init", None), getattr(model, "lr_scheduler_init", None))
    checkpoint = check_checkpoint(ckpt_path)
    check_model(model, checkpoint, ckpt_path)


def check_config_files(argv: list[str]) -> None:
    """Each ``--config FILE`` exists and holds a YAML mapping (jsonargparse's own words for an empty or
    malformed file name neither the file nor the problem)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            continue
        path = Path(name).expanduser()
        if not path.is_file():
            raise LitPeftError(f"--config '{name}' {'is not a file' if path.exists() else 'does not exist'}")
        try:
            config = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise LitPeftError(f"--config '{name}': not valid YAML{line} ({problem})") from None
        if config is None:
            raise LitPeftError(
                f"--config '{name}' is empty; a config is a YAML mapping, e.g. configs/lora.yaml"
            )
        if not isinstance(config, dict):
            raise LitPeftError(
                f"--config '{name}' holds a {type(config).__name__}, not a mapping of keys (model:, data:, ...)"
            )
