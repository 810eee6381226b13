"""Bad rows: each case stops with the file, the line (or row) and the field; ``skip_bad_rows`` skips
them and reports how many; an empty dataset, before or after filtering, is always an error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from litpeft.data import AutoSource, InstructionDataModule
from litpeft.errors import LitPeftError

GOOD = json.dumps({"instruction": "Add 2 and 3", "output": "5"})
CHAT_OK = {"role": "user", "content": "Hi"}

# (second line of a .jsonl file, message that must appear after "<file>:2: ")
CASES = [
    ('{"instruction": "a", "output": }', "malformed JSON (Expecting value at column 32)"),
    ('{"instruction": "a"}', "field 'output' is missing or empty"),
    ('{"instruction": "   ", "output": "b"}', "field 'instruction' is missing or empty"),
    ('{"instruction": "a", "output": 5}', "field 'output' must be a string, got int"),
    ('{"instruction": "a", "input": ["x"], "output": "b"}', "field 'input' must be a string, got list"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"just text"', "expected a JSON object, got str"),
    (json.dumps({"messages": "hello"}), "field 'messages' must be a list of turns, got str"),
    (json.dumps({"messages": []}), "field 'messages' is missing or empty"),
    (
        json.dumps({"messages": [CHAT_OK, {"role": "bot", "content": "x"}]}),
        "field 'messages[1].role' has unknown role 'bot' (known: assistant, system, user)",
    ),
    (
        json.dumps({"messages": [CHAT_OK, {"role": "assistant"}]}),
        "field 'messages[1].content' is missing or empty",
    ),
    (
        json.dumps({"messages": [CHAT_OK, {"role": "assistant", "content": {"a": 1}}]}),
        "field 'messages[1].content' must be a string, got dict",
    ),
    (json.dumps({"messages": [CHAT_OK, "hi"]}), "field 'messages[1]' must be an object, got str"),
    (json.dumps({"messages": [CHAT_OK]}), "field 'messages' has no assistant turn (nothing to learn from)"),
    (
        json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": 3}]}),
        "field 'conversations[1].value' must be a string, got int",
    ),
]


@pytest.mark.parametrize(("line", "message"), CASES, ids=[m.split(" (")[0] for _, m in CASES])
def test_bad_row_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(LitPeftError) as err:
        AutoSource().load(path)
    assert str(err.value) == f"{path}:2: {message} (set data.skip_bad_rows: true to skip bad rows)"


@pytest.mark.parametrize(("line", "message"), CASES, ids=[m.split(" (")[0] for _, m in CASES])
def test_skip_bad_rows_skips_and_counts(tmp_path: Path, line: str, message: str, caplog: Any) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n{line}\n")
    with caplog.at_level(logging.WARNING):
        loaded = AutoSource().load(path, skip_bad_rows=True)
    assert len(loaded.samples) == 2 and loaded.rows == 4
    assert [str(b) for b in loaded.skipped] == [f"{path}:2: {message}", f"{path}:4: {message}"]
    assert f"skipped 2 bad rows of 4 (skip_bad_rows: true); first: {path}:2: {message}" in caplog.text


def test_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(LitPeftError, match=re.escape(f"{path}:2: is not UTF-8 text")):
        AutoSource().load(path)


def test_json_list_rows_are_named_by_index(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps([json.loads(GOOD), {"instruction": "a", "output": ""}]))
    with pytest.raises(LitPeftError, match=re.escape(f"{path} row 1: field 'output' is missing or empty")):
        AutoSource().load(path)


def test_malformed_json_list_cannot_be_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(
        LitPeftError, match=re.escape(f"{path}:3: malformed JSON (Expecting ',' delimiter at column 23)")
    ):
        AutoSource().load(path, skip_bad_rows=True)


def test_csv_row_index_and_field(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("instruction,output\na,b\nc,\n")
    with pytest.raises(LitPeftError, match=re.escape(f"{path} row 1: field 'output' is missing or empty")):
        AutoSource().load(path)


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"], ids=["empty", "blank-lines", "empty-list"])
def test_empty_dataset(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("t.json" if content == "[]" else "t.jsonl")
    path.write_text(content)
    with pytest.raises(LitPeftError, match=re.escape(f"data '{path}' is empty: it has no rows")):
        AutoSource().load(path, skip_bad_rows=True)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a"}\n{"output": "b"}\n')
    with pytest.raises(
        LitPeftError,
        match=re.escape(
            f"data '{path}': all 2 rows are bad, none is left (first: {path}:1: field 'output' is missing or empty)"
        ),
    ):
        AutoSource().load(path, skip_bad_rows=True)


def test_data_module_reports_skipped_rows(tmp_path: Path, tok: Any, caplog: Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f"{GOOD}\n{{bad\n{GOOD}\n")
    dm = InstructionDataModule(str(path), val_fraction=0.0, skip_bad_rows=True, cache=False)
    dm.tokenizer = tok
    with caplog.at_level(logging.INFO):
        dm.setup()
    assert dm.stats["train"]["skipped"] == 1 and len(dm.train_data) == 2
    assert "1 bad rows skipped" in caplog.text


def test_empty_after_filtering_is_an_error(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n")
    dm = InstructionDataModule(str(path), val_fraction=0.0, max_seq_length=8, truncation="drop", cache=False)
    dm.tokenizer = tok
    with pytest.raises(
        LitPeftError,
        match=re.escape(
            f"no training sample of '{path}' is left after filtering (2 dropped by max_seq_length=8)"
        ),
    ):
        dm.setup()


def test_truncation_error_names_the_sample(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "t.jsonl"
    short = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{short}\n{GOOD}\n")
    dm = InstructionDataModule(
        str(path), val_fraction=0.0, max_seq_length=32, truncation="error", cache=False
    )
    dm.tokenizer = tok
    # "<|im_start|>user\nAdd 2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n": 29 bytes + 4 specials
    message = f"{path}:2: 33 tokens, more than data.max_seq_length=32 (data.truncation: error; use truncate or drop)"
    with pytest.raises(LitPeftError, match=re.escape(message)):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"truncation": "cut"}, "data.truncation must be truncate, drop or error, got 'cut'"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        ({"max_seq_length": 0}, "data.max_seq_length must be at least 1, got 0"),
        (
            {"packing": True, "group_by_length": True},
            "data.packing and data.group_by_length exclude each other",
        ),
    ],
)
def test_bad_options_fail_early(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LitPeftError, match=re.escape(message)):
        InstructionDataModule("x.jsonl", **kwargs)
