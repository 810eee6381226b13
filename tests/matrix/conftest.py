"""Fixtures of the matrix tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny models' matrices are too small for two threads: on a shared 2-core machine a second
    thread makes each cell several times slower (contention), never faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
