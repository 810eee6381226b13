"""Named classes: a built-in short name (``lora``, ``chatml``) or a user's ``package.module.Class``."""

from __future__ import annotations

import importlib
from typing import TypeVar

from litpeft.errors import LitPeftError

T = TypeVar("T")


def resolve_class(name: str, registry: dict[str, type[T]], base: type[T], kind: str) -> type[T]:
    """The class ``name`` stands for: a key of ``registry``, or an import path to a ``base`` subclass.

    ``kind`` names what is looked up in error messages ("method", "prompt style").
    """
    if name in registry:
        return registry[name]
    module, _, qualname = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname) if module else None
    except (ImportError, AttributeError, ValueError):
        cls = None
    if cls is None:
        raise LitPeftError(f"unknown {kind} '{name}'; built-in: {', '.join(sorted(registry))}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise LitPeftError(f"'{name}' is not a litpeft {base.__name__}")
    return cls


def class_name(cls: type, registry: dict[str, type]) -> str:
    """How ``cls`` is saved: its short name when registered under it, else its import path."""
    short = getattr(cls, "name", "")
    return short if short and registry.get(short) is cls else f"{cls.__module__}.{cls.__qualname__}"
