"""Named classes: a built-in short name or a user's import path, and nothing else."""

from __future__ import annotations

import pytest

from litpeft.errors import LitPeftError
from litpeft.registry import class_name, resolve_class


class Base:
    name = ""


class Short(Base):
    name = "short"


class Unregistered(Base):
    name = "unregistered"


REGISTRY: dict[str, type[Base]] = {"short": Short}


def test_short_names_and_import_paths_resolve() -> None:
    assert resolve_class("short", REGISTRY, Base, "thing") is Short
    assert resolve_class(f"{__name__}.Unregistered", REGISTRY, Base, "thing") is Unregistered


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", r"unknown thing 'nope'; built-in: short"),
        ("no_such_module.Class", r"unknown thing 'no_such_module.Class'"),
        (f"{__name__}.Missing", r"unknown thing '.*\.Missing'"),
        ("collections.OrderedDict", r"'collections.OrderedDict' is not a litpeft Base"),
    ],
)
def test_anything_else_is_one_clear_error(name: str, message: str) -> None:
    with pytest.raises(LitPeftError, match=message):
        resolve_class(name, REGISTRY, Base, "thing")


def test_a_class_is_saved_by_short_name_only_when_registered_under_it() -> None:
    assert class_name(Short, REGISTRY) == "short"
    assert class_name(Unregistered, REGISTRY) == f"{__name__}.Unregistered"
