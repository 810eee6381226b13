"""What a fit keeps when the command line switches the method (``--config configs/lora.yaml
--model.method VeRA``): the learning rate and the method's arguments set for this method, the method's
own otherwise.

jsonargparse keeps the init_args the old and the new class share when ``class_path`` changes, so VeRA
would train with LoRA's ``r: 16`` and AdamW with LoRA's LR; :func:`choose_lr` and :func:`choose_method_args`
put the new method's defaults back, and the log says which and why.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# the command-line keys of the method, as a whole or one init arg (``--model.method.init_args.r``)
METHOD_KEYS = ("--model.method", "--model.init_args.method")


def _lr_of(optimizer: Any) -> Any:
    if not isinstance(optimizer, dict):
        return None
    return (optimizer.get("init_args") or {}).get("lr", optimizer.get("lr"))


def _method_of(config: dict[str, Any]) -> Any:
    """``model.init_args.method`` of a config file (a class path, a dict, or None)."""
    model = config.get("model") or {}
    args = model.get("init_args", model) if isinstance(model, dict) else {}
    return args.get("method") if isinstance(args, dict) else None


def _class_name(method: Any) -> str | None:
    path = method.get("class_path") if isinstance(method, dict) else method
    return str(path).rsplit(".", 1)[-1] if path else None


def _method_name(config: dict[str, Any]) -> str | None:
    """The class name of the method a config file sets (``model.init_args.method``), else None."""
    return _class_name(_method_of(config))


def _method_args(method: Any) -> dict[str, Any]:
    """The init args a method's dict sets (``{class_path, init_args: {...}}`` or the args flat)."""
    if not isinstance(method, dict):
        return {}
    args = method.get("init_args", {k: v for k, v in method.items() if k != "class_path"})
    return args if isinstance(args, dict) else {}


def _settings(argv: list[str]) -> Iterator[tuple[str, str, Any]]:
    """``(option, where, value)`` for each option of argv: a config file's as ``("--config", path, its
    dict)``, any other as ``(option, "the command line", its value)`` (``--a=b`` and ``--a b`` alike)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            continue
        option, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if option in ("-c", "--config"):
            if Path(value).is_file():
                config = yaml.safe_load(Path(value).read_text()) or {}
                yield "--config", value, config if isinstance(config, dict) else {}
        else:
            yield option, "the command line", value


def lr_source(argv: list[str], method: str) -> tuple[str | None, str | None]:
    """``(where the user set the learning rate for method, a config file whose LR is another method's)``.

    ``method`` is a class name. The command line counts, and a config file that sets an LR for this
    method (or names none); one that sets it for another method (``--config configs/lora.yaml
    --model.method PromptTuning``) sets LoRA's LR, not prompt tuning's.
    """
    source = other = None
    for option, where, value in _settings(argv):
        whole = option in ("--optimizer", "--optimizer.init_args") and "lr" in str(value)
        if option.startswith("--optimizer") and ("lr" in option or whole):
            return "the command line", None
        if option == "--config" and _lr_of(value.get("optimizer")) is not None:
            named = _method_name(value)
            source, other = (
                (where, None) if named in (None, method) else (None, f"the lr in {where} is {named}'s")
            )
    return source, other


def _load_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def choose_lr(config: Any, argv: list[str]) -> None:
    """The fit's learning rate: the user's for this method, else the method's recommended
    (:attr:`PeftMethod.learning_rate`); the log says which and why."""
    method = config["model"]["init_args"]["method"]
    path = method.get("class_path")
    optimizer = config.get("optimizer")
    if not path or optimizer is None or "lr" not in (optimizer.get("init_args") or {}):
        return
    cls = _load_class(path)
    name = path.rsplit(".", 1)[-1]
    source, other = lr_source(argv, name)
    if source is not None:
        log.info("learning rate %g (set in %s)", optimizer["init_args"]["lr"], source)
        return
    optimizer["init_args"]["lr"] = cls.learning_rate
    why = f"no lr set for {name}" + (f"; {other}" if other else "")
    log.info("learning rate %g: %s's recommended (%s)", cls.learning_rate, name, why)


def method_args_source(argv: list[str], method: str) -> tuple[set[str], dict[str, str]]:
    """``(the init args the user set for method, {arg: whose value it is} for those set for another)``.

    ``method`` is a class name. Set for it: ``--model.method.init_args.X`` (or ``--model.method.X``), a
    whole ``--model.method '{...}'`` that names it or no class, a config file whose method is it or names
    no class. Set for another: the args of a config file or a whole ``--model.method`` naming another.
    """
    mine: set[str] = set()
    other: dict[str, str] = {}
    for option, where, value in _settings(argv):
        if option == "--config":
            named, args = _method_name(value), _method_args(_method_of(value))
        elif option in METHOD_KEYS:  # a class name, a JSON/YAML dict, or a file holding one
            if Path(value).is_file():
                value = Path(value).read_text()
            loaded = yaml.safe_load(value) if value else None
            named, args = _class_name(loaded), _method_args(loaded)
        elif option.startswith(tuple(f"{k}." for k in METHOD_KEYS)):
            arg = option.rsplit(".", 1)[-1]
            if arg == "init_args":  # a dict of them
                loaded = yaml.safe_load(value) if value else None
                mine.update(loaded if isinstance(loaded, dict) else ())
            elif arg not in ("help", "class_path"):
                mine.add(arg)
            continue
        else:
            continue
        for arg in args:
            if named in (None, method):
                mine.add(arg)
            else:
                other[arg] = f"in {where} is {named}'s"
    return mine, other


def choose_method_args(config: Any, argv: list[str]) -> None:
    """Each init arg of the fit's method: the user's for this method, else the method's default (not the
    value of another method that jsonargparse kept when the command line switched the class); the log
    says which were reset and why."""
    model = config.get("model") or {}
    method = (model.get("init_args") or {}).get("method")
    path = method.get("class_path") if method is not None else None
    args = method.get("init_args") if path else None
    if not path or not args:
        return
    name = path.rsplit(".", 1)[-1]
    defaults = {
        p.name: p.default
        for p in inspect.signature(_load_class(path)).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    mine, other = method_args_source(argv, name)
    reset = []
    for arg, value in list(args.items()):
        if arg in mine or arg not in defaults or value == defaults[arg]:
            continue
        args[arg] = defaults[arg]
        whose = other.get(arg, "was the previous method's")
        reset.append(f"{arg}: {defaults[arg]}, {name}'s default (the {value} {whose})")
    if reset:
        log.info("method %s: %s", name, "; ".join(reset))


def choose_switched(config: Any, argv: list[str], subcommand: str | None) -> None:
    """The method's init args and (for a fit) the learning rate, as :func:`choose_method_args` and
    :func:`choose_lr` say: once before the classes are built, or before ``--print_config`` prints."""
    choose_method_args(config, argv)
    if subcommand == "fit":
        choose_lr(config, argv)
