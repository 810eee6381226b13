"""Where instruction data comes from. A source reads rows from a path and turns each into chat messages.

Two things vary independently and are kept apart:

- *storage*, found from the path (:mod:`litpeft.data.readers`): a hub dataset ``hub://org/name``
  (downloaded on first use), ``.json`` (a list of objects) and
  ``.jsonl`` are read by litpeft, with line numbers for errors; ``.parquet``, ``.csv``, ``.tsv``,
  ``.arrow`` and a directory written by ``datasets.Dataset.save_to_disk`` are read through Hugging Face
  ``datasets`` (the optional extra ``litpeft[data]``); any other directory is read file by file, in
  sorted order.
- *row format*, chosen by the source class (this module): :class:`Alpaca` (``instruction``/``input``/
  ``output``), :class:`Chat` (OpenAI ``messages``), :class:`ShareGPT` (``conversations``), or
  :class:`AutoSource` (the default: decides per row from its keys). :class:`HFDataset` reads every path
  through ``datasets``.

A user adds a format by subclassing :class:`DataSource` and implementing :meth:`DataSource.to_messages`,
then naming the class by ``class_path`` under ``data.source``.

Every problem with a row is a :class:`BadRow` naming the file, the line (``.jsonl``, malformed ``.json``)
or row index, and the field.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from litpeft import hub
from litpeft.data.prompts import Message
from litpeft.data.readers import (
    DATASETS_BUILDERS,
    SUFFIXES,
    BadRow,
    data_files,
    file_rows,
    hub_rows,
    is_saved_dataset,
    require_datasets,
)
from litpeft.errors import LitPeftError

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
ROLES = ("system", "user", "assistant")


@dataclass
class LoadedData:
    """What :meth:`DataSource.load` returns: the samples, and the bad rows it skipped."""

    samples: list[list[Message]]
    rows: int
    skipped: list[BadRow] = field(default_factory=list)
    #: where each sample comes from (``file:line`` or ``file row i``), for later errors
    locations: list[str] = field(default_factory=list)


class DataSource:
    """Base class: reads rows from a file, a directory of files or a saved dataset; subclasses convert rows.

    Args:
        reader: ``auto`` reads ``.json``/``.jsonl`` itself (exact line numbers in errors) and everything else
            through ``datasets``; ``datasets`` reads every file through ``datasets.load_dataset``.
        split: split of a saved ``DatasetDict`` or a hub dataset (``hub://org/name``) that ``train_file``
            names.
        val_split: the same for ``val_file``.
        load_kwargs: extra keyword arguments for ``datasets.load_dataset`` (e.g. ``{delimiter: ";"}``, or
            ``{name: <config>}`` for a hub dataset).
    """

    def __init__(
        self,
        reader: Literal["auto", "datasets"] = "auto",
        split: str = "train",
        val_split: str = "validation",
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if reader not in ("auto", "datasets"):
            raise LitPeftError(f"data.source.reader must be 'auto' or 'datasets', got '{reader}'")
        self.reader, self.split, self.val_split = reader, split, val_split
        self.load_kwargs = load_kwargs or {}

    # -- row format: what subclasses implement --------------------------------------------------------
    def to_messages(self, row: Any, where: str) -> list[Message]:
        """One row as chat messages; raise :class:`BadRow` when it does not fit."""
        raise NotImplementedError

    # -- storage (litpeft.data.readers) ---------------------------------------------------------------
    def files(self, path: str | Path) -> list[Path]:
        """The data files (or the one saved-dataset directory) that ``path`` stands for."""
        return data_files(path)

    def rows(self, path: str | Path, role: Literal["train", "val"] = "train") -> Iterator[tuple[str, Any]]:
        """``(location, row)`` for every row under ``path``; a malformed row comes as a :class:`BadRow`."""
        split = self.split if role == "train" else self.val_split
        if hub.is_hub_dataset(path):
            yield from hub_rows(str(path), split, self.reader, self.load_kwargs)
            return
        for file in self.files(path):
            yield from file_rows(file, self.reader, split, self.load_kwargs)

    # -- both -----------------------------------------------------------------------------------------
    def load(
        self, path: str | Path, role: Literal["train", "val"] = "train", skip_bad_rows: bool = False
    ) -> LoadedData:
        """All samples under ``path``. A bad row raises, or with ``skip_bad_rows`` is skipped and counted."""
        samples: list[list[Message]] = []
        skipped: list[BadRow] = []
        locations: list[str] = []
        n = 0
        for where, row in self.rows(path, role):
            n += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                samples.append(self.to_messages(row, where))
                locations.append(where)
            except BadRow as bad:
                if not skip_bad_rows:
                    raise LitPeftError(f"{bad} (set data.skip_bad_rows: true to skip bad rows)") from None
                skipped.append(bad)
        if n == 0:
            raise LitPeftError(f"data '{path}' is empty: it has no rows")
        if skipped:
            log.warning(
                "%s: skipped %d bad row%s of %d (skip_bad_rows: true); first: %s",
                path,
                len(skipped),
                "" if len(skipped) == 1 else "s",
                n,
                skipped[0],
            )
        if not samples:
            raise LitPeftError(f"data '{path}': all {n} rows are bad, none is left (first: {skipped[0]})")
        return LoadedData(samples, n, skipped, locations)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


# -- field checks -----------------------------------------------------------------------------------------
def text_field(
    row: dict[str, Any], key: str, where: str, required: bool = True, name: str | None = None
) -> str:
    """``row[key]`` as a string; a missing, empty or non-string value is a :class:`BadRow`."""
    value = _require_object(row, where).get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow(where, "is missing or empty", name or key)
        return ""
    if not isinstance(value, str):
        raise BadRow(where, f"must be a string, got {type(value).__name__}", name or key)
    return value


def _require_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise BadRow(where, f"expected a JSON object, got {type(row).__name__}")
    return row


# -- row formats ------------------------------------------------------------------------------------------
class Alpaca(DataSource):
    """Alpaca rows: ``instruction``, optional ``input``, ``output`` (and an optional ``system``).

    Args:
        column_map: the row's names for these fields, e.g. Dolly's
            ``{instruction: instruction, input: context, output: response}``.
    """

    FIELDS = ("instruction", "input", "output", "system")

    def __init__(self, column_map: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = set(column_map or {}) - set(self.FIELDS)
        if unknown:
            raise LitPeftError(
                f"data.source column_map has unknown keys {sorted(unknown)}; use: {', '.join(self.FIELDS)}"
            )
        self.column_map = column_map or {}

    def to_messages(self, row: Any, where: str, need_answer: bool = True) -> list[Message]:
        """``need_answer=False`` (prompts to generate from): ``output`` may be missing."""
        row = _require_object(row, where)
        cols = {f: f for f in self.FIELDS} | self.column_map
        instruction = text_field(row, cols["instruction"], where)
        extra = text_field(row, cols["input"], where, required=False)
        output = text_field(row, cols["output"], where, required=need_answer)
        system = text_field(row, cols["system"], where, required=False)
        return [
            *([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": instruction, "input": extra},
            *([{"role": "assistant", "content": output}] if output else []),
        ]


class Chat(DataSource):
    """Multi-turn chat rows in OpenAI's shape: ``{"messages": [{"role": ..., "content": ...}, ...]}``.

    Roles are ``system``, ``user`` and ``assistant``; the loss covers every assistant turn. ``content`` may
    also be a list of ``{"type": "text", "text": ...}`` parts.

    Args:
        column: the row's field that holds the turns.
        role_key: each turn's field with the speaker.
        content_key: each turn's field with the text.
        role_map: speaker names of the data -> ``system``/``user``/``assistant``.
    """

    def __init__(
        self,
        column: str = "messages",
        role_key: str = "role",
        content_key: str = "content",
        role_map: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.column, self.role_key, self.content_key = column, role_key, content_key
        self.role_map = role_map or {}
        bad = {r for r in self.role_map.values() if r not in ROLES}
        if bad:
            raise LitPeftError(
                f"data.source role_map maps to unknown roles {sorted(bad)}; use: {', '.join(ROLES)}"
            )

    def to_messages(self, row: Any, where: str, need_answer: bool = True) -> list[Message]:
        """``need_answer=False`` (prompts to generate from): a conversation without an assistant turn is fine."""
        row = _require_object(row, where)
        turns = row.get(self.column)
        if turns is None or (isinstance(turns, list) and not turns):
            raise BadRow(where, "is missing or empty", self.column)
        if not isinstance(turns, list):
            raise BadRow(where, f"must be a list of turns, got {type(turns).__name__}", self.column)
        messages: list[Message] = []
        for j, turn in enumerate(turns):
            name = f"{self.column}[{j}]"
            if not isinstance(turn, dict):
                raise BadRow(where, f"must be an object, got {type(turn).__name__}", name)
            speaker = text_field(turn, self.role_key, where, name=f"{name}.{self.role_key}")
            role = self.role_map.get(speaker, speaker)
            if role not in ROLES:
                known = sorted({*ROLES, *self.role_map})
                raise BadRow(
                    where,
                    f"has unknown role '{speaker}' (known: {', '.join(known)})",
                    f"{name}.{self.role_key}",
                )
            content = turn.get(self.content_key)
            if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" for p in content
            ):
                content = "".join(str(p.get("text", "")) for p in content)
            content = text_field({"c": content}, "c", where, name=f"{name}.{self.content_key}")
            messages.append({"role": role, "content": content})
        if need_answer and not any(m["role"] == "assistant" for m in messages):
            raise BadRow(where, "has no assistant turn (nothing to learn from)", self.column)
        return messages


class ShareGPT(Chat):
    """ShareGPT rows: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``."""

    ROLE_MAP = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
    }

    def __init__(
        self,
        column: str = "conversations",
        role_key: str = "from",
        content_key: str = "value",
        role_map: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(column, role_key, content_key, {**self.ROLE_MAP, **(role_map or {})}, **kwargs)


class AutoSource(DataSource):
    """The default: each row is read as :class:`Chat` if it has ``messages``, :class:`ShareGPT` if it has
    ``conversations``, else as :class:`Alpaca`.

    Args:
        column_map: passed to :class:`Alpaca` (for rows without ``messages``/``conversations``).
    """

    def __init__(self, column_map: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.column_map = column_map
        self._formats: dict[str, DataSource] = {
            "messages": Chat(),
            "conversations": ShareGPT(),
            "alpaca": Alpaca(column_map),
        }

    def to_messages(self, row: Any, where: str, need_answer: bool = True) -> list[Message]:
        row = _require_object(row, where)
        key = next((k for k in ("messages", "conversations") if k in row), "alpaca")
        return self._formats[key].to_messages(row, where, need_answer=need_answer)

    def __repr__(self) -> str:
        return f"AutoSource(column_map={self.column_map!r}, reader={self.reader!r})"


class HFDataset(AutoSource):
    """Any path read through Hugging Face ``datasets``: ``load_dataset(<format>, data_files=path)`` for
    parquet/CSV/JSON/arrow files, ``load_from_disk`` for a ``save_to_disk`` directory. Rows as in
    :class:`AutoSource`.
    """

    def __init__(
        self,
        column_map: dict[str, str] | None = None,
        reader: Literal["auto", "datasets"] = "datasets",
        split: str = "train",
        val_split: str = "validation",
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(column_map, reader=reader, split=split, val_split=val_split, load_kwargs=load_kwargs)


def load_alpaca(path: str | Path, column_map: dict[str, str] | None = None) -> list[list[Message]]:
    """Samples of an Alpaca file (kept for callers of the spine's API)."""
    return Alpaca(column_map).load(path).samples


__all__ = [
    "DATASETS_BUILDERS",
    "DEMO_DIR",
    "SUFFIXES",
    "Alpaca",
    "AutoSource",
    "BadRow",
    "Chat",
    "DataSource",
    "HFDataset",
    "LoadedData",
    "ShareGPT",
    "is_saved_dataset",
    "load_alpaca",
    "require_datasets",
    "text_field",
]


def __getattr__(name: str) -> Any:
    if name != "Loaded":
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    warnings.warn(
        f"{__name__}.Loaded moved to {__name__}.LoadedData; the old path goes in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return LoadedData
