"""The tokenization cache: a second setup on the same data tokenizes nothing; a changed file, tokenizer,
style or ``train_on_inputs`` is a miss; ``max_seq_length`` is applied after the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import litpeft.data.datamodule as datamodule
from litpeft.data import InstructionDataModule
from litpeft.models import tiny_tokenizer


def write(path: Path, n: int, start: int = 0) -> str:
    rows = [{"instruction": f"Add {i} and 1", "output": str(i + 1)} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def setup(tok: Any, train: str, val: str, **kwargs: Any) -> InstructionDataModule:
    dm = InstructionDataModule(train, val_file=val, **kwargs)
    dm.tokenizer = tok
    dm.setup()
    return dm


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    return write(tmp_path / "train.jsonl", 6), write(tmp_path / "val.jsonl", 2, start=100)


def forbid_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(datamodule, "encode_many", fail)


def test_second_setup_is_a_cache_hit(
    tok: Any, files: tuple[str, str], private_cache: Path, monkeypatch: Any
) -> None:
    first = setup(tok, *files)
    assert first.stats["train"]["tokenized"] == 6 and first.stats["val"]["tokenized"] == 2
    assert len(list((private_cache / "data").glob("*.safetensors"))) == 2
    forbid_tokenizing(monkeypatch)
    second = setup(tok, *files)
    assert second.stats["train"]["tokenized"] == 0 and second.stats["val"]["tokenized"] == 0
    for a, b in ((first.train_data, second.train_data), (first.val_data, second.val_data)):
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(
                a[i]["labels"], b[i]["labels"]
            )


def test_changed_file_is_a_miss(tok: Any, files: tuple[str, str], tmp_path: Path) -> None:
    setup(tok, *files)
    write(tmp_path / "val.jsonl", 2, start=200)  # same size, other content
    dm = setup(tok, *files)
    assert dm.stats["train"]["tokenized"] == 0  # the training file did not change
    assert dm.stats["val"]["tokenized"] == 2


@pytest.mark.parametrize(
    "change",
    [{"prompt_style": "alpaca"}, {"train_on_inputs": True}, {"tokenizer": "other"}],
    ids=["style", "train_on_inputs", "tokenizer"],
)
def test_what_changes_the_tokens_is_a_miss(tok: Any, files: tuple[str, str], change: dict[str, Any]) -> None:
    setup(tok, *files)
    if change.get("tokenizer"):
        other = tiny_tokenizer()
        other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
        dm = setup(other, *files)
    else:
        dm = setup(tok, *files, **change)
    assert dm.stats["train"]["tokenized"] == 6


def test_max_seq_length_is_applied_after_the_cache(
    tok: Any, files: tuple[str, str], monkeypatch: Any
) -> None:
    full = setup(tok, *files)
    forbid_tokenizing(monkeypatch)
    cut = min(full.train_data.lengths) - 2  # inside every answer: "N<|im_end|>\n" loses its end
    short = setup(tok, *files, max_seq_length=cut)
    assert short.stats["train"]["tokenized"] == 0
    assert short.stats["train"]["truncated"] == 6 and max(short.train_data.lengths) == cut
    assert torch.equal(short.train_data[0]["input_ids"], full.train_data[0]["input_ids"][:cut])


def test_cache_off_writes_nothing(tok: Any, files: tuple[str, str], private_cache: Path) -> None:
    setup(tok, *files, cache=False)
    dm = setup(tok, *files, cache=False)
    assert dm.stats["train"]["tokenized"] == 6
    assert not (private_cache / "data").exists()


def test_unreadable_cache_file_is_rebuilt(tok: Any, files: tuple[str, str], private_cache: Path) -> None:
    setup(tok, *files)
    for f in (private_cache / "data").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    dm = setup(tok, *files)
    assert dm.stats["train"]["tokenized"] == 6
    assert setup(tok, *files).stats["train"]["tokenized"] == 0
