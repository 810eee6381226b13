"""Fixtures of the PEFT method tests; their plain helpers are in ``method_helpers``."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from litpeft.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    """The tiny byte-level tokenizer, one per test module (tests set its ``padding_side``)."""
    return tiny_tokenizer()
