"""Where instruction data comes from. Every source yields samples as lists of chat messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from litpeft.data.prompts import Message
from litpeft.errors import LitPeftError

DEMO_DIR = Path(__file__).parent / "demo"


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a ``.json`` (a list of objects) or ``.jsonl`` file, each with a location for errors."""
    path = Path(path)
    if not path.is_file():
        raise LitPeftError(f"data file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise LitPeftError(f"{path}:{i}: malformed JSON ({e.msg})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LitPeftError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise LitPeftError(f"{path}: expected a JSON list of objects")
    return [(f"{path}[{i}]", row) for i, row in enumerate(data)]


def alpaca_messages(row: Any, where: str, column_map: dict[str, str] | None = None) -> list[Message]:
    """An Alpaca row (``instruction``, optional ``input``, ``output``) as a user and an assistant message."""
    if not isinstance(row, dict):
        raise LitPeftError(f"{where}: expected a JSON object, got {type(row).__name__}")
    cols = {"instruction": "instruction", "input": "input", "output": "output", **(column_map or {})}
    for field in ("instruction", "output"):
        value = row.get(cols[field])
        if value is None or (isinstance(value, str) and not value.strip()):
            raise LitPeftError(f"{where}: missing or empty field '{cols[field]}'")
        if not isinstance(value, str):
            raise LitPeftError(f"{where}: field '{cols[field]}' must be a string, got {type(value).__name__}")
    extra = row.get(cols["input"]) or ""
    if not isinstance(extra, str):
        raise LitPeftError(f"{where}: field '{cols['input']}' must be a string, got {type(extra).__name__}")
    return [
        {"role": "user", "content": row[cols["instruction"]], "input": extra},
        {"role": "assistant", "content": row[cols["output"]]},
    ]


def load_alpaca(path: str | Path, column_map: dict[str, str] | None = None) -> list[list[Message]]:
    return [alpaca_messages(row, where, column_map) for where, row in read_records(path)]
