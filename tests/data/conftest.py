"""Fixtures of the data tests: the tiny byte-level tokenizer, a private cache, small data files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from litpeft.models import tiny_tokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own litpeft cache (tokenized data, datasets' own cache)."""
    cache = tmp_path / "litpeft-cache"
    monkeypatch.setenv("LITPEFT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tok() -> Any:
    return tiny_tokenizer()
