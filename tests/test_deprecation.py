"""Old import paths keep working for one release, each with one warning that names the new path."""

from __future__ import annotations

import importlib
import sys

import pytest

from litpeft.deprecation import moved_names


def test_a_moved_module_is_its_new_module_with_a_warning() -> None:
    sys.modules.pop("litpeft.adapter", None)
    with pytest.warns(FutureWarning, match=r"litpeft\.adapter moved to litpeft\.adapter_dir"):
        old = importlib.import_module("litpeft.adapter")
    new = importlib.import_module("litpeft.adapter_dir")
    assert old is new and old.load_adapter is new.load_adapter


def test_moved_names_forward_each_name_and_refuse_others() -> None:
    getattr_ = moved_names("old.place", {"dumps": "json"})
    with pytest.warns(FutureWarning, match=r"old\.place\.dumps moved to json\.dumps"):
        assert getattr_("dumps") is importlib.import_module("json").dumps
    with pytest.raises(AttributeError, match="has no attribute 'loads'"):
        getattr_("loads")
