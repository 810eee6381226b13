"""Old import paths that keep working for one release, with one warning line each.

A config that names a moved class by its old ``class_path`` still runs; the warning says the new path.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes in the next release", FutureWarning, stacklevel=3)


def moved_module(old: str, new: str) -> None:
    """Make module ``old`` an alias of module ``new`` (call it as the whole body of ``old``)."""
    _warn(old, new)
    sys.modules[old] = importlib.import_module(new)


def moved_names(old_module: str, moves: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that finds each moved name in its new module: ``{name: new_module}``."""

    def __getattr__(name: str) -> Any:
        if name not in moves:
            raise AttributeError(f"module '{old_module}' has no attribute '{name}'")
        _warn(f"{old_module}.{name}", f"{moves[name]}.{name}")
        return getattr(importlib.import_module(moves[name]), name)

    return __getattr__
