"""Storage: the rows under a path, read from a file, a directory of files or a saved dataset.

``.json`` (a list of objects) and ``.jsonl`` are read here, with line numbers for errors; ``.parquet``,
``.csv``, ``.tsv``, ``.arrow`` and a directory written by ``datasets.Dataset.save_to_disk`` are read
through Hugging Face ``datasets`` (the optional extra ``litpeft[data]``); any other directory is read file
by file, in sorted order. ``hub://org/name[@revision][/path]`` is a dataset repo on the Hugging Face hub,
downloaded into the Hugging Face cache on first use (:func:`hub_rows`). Each row comes with its location
(``file:line`` or ``file row i``); what a row *means* is up to the source (:mod:`litpeft.data.sources`).
A malformed row is a :class:`BadRow`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from litpeft import hub
from litpeft.errors import LitPeftError
from litpeft.files import cache_dir

#: file suffix -> builder name of ``datasets.load_dataset``
DATASETS_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
}
SUFFIXES = tuple(DATASETS_BUILDERS)
#: What a whole hub dataset repo contributes: its data files and the README that declares its configs.
HUB_DATASET_FILES = [f"*{suffix}" for suffix in SUFFIXES] + ["README.md"]


class BadRow(LitPeftError):
    """One row that cannot become a sample: where it is, which field, and what is wrong."""

    def __init__(self, where: str, problem: str, field: str | None = None) -> None:
        self.where, self.problem, self.field = where, problem, field
        super().__init__(f"{where}: " + (f"field '{field}' {problem}" if field else problem))


def require_datasets() -> Any:
    """Import Hugging Face ``datasets`` or fail with the install line."""
    try:
        import datasets  # here, not at the top: heavy, and optional (the extra litpeft[data])
    except ImportError:
        raise LitPeftError(
            "reading parquet/CSV/arrow files or save_to_disk directories needs the 'datasets' package: "
            "pip install 'litpeft[data]'"
        ) from None
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def data_files(path: str | Path) -> list[Path]:
    """The data files (or the one saved-dataset directory) that ``path`` stands for."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if is_saved_dataset(path):
        return [path]
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise LitPeftError(f"data directory '{path}' has no data files ({', '.join(SUFFIXES)})")
        return found
    raise LitPeftError(f"data file '{path}' does not exist")


def file_rows(
    file: Path, reader: str = "auto", split: str = "train", load_kwargs: dict[str, Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for every row of one of :func:`data_files`; a malformed row comes as a
    :class:`BadRow`. ``reader="datasets"`` reads JSON files through ``datasets`` too; ``split`` is the
    split of a saved ``DatasetDict``."""
    if file.is_dir():
        yield from saved_rows(file, split)
    elif reader == "auto" and file.suffix == ".jsonl":
        yield from jsonl_rows(file)
    elif reader == "auto" and file.suffix == ".json":
        yield from json_rows(file)
    elif file.suffix in DATASETS_BUILDERS:
        yield from datasets_rows(file, load_kwargs or {})
    else:
        raise LitPeftError(f"data file '{file}' has an unknown suffix; use one of: {', '.join(SUFFIXES)}")


# -- JSON files, read here ---------------------------------------------------------------------------------
def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{i}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield where, BadRow(where, "is not UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadRow(where, f"malformed JSON ({e.msg} at column {e.colno})")


def json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LitPeftError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):  # JSON lines under a .json name, as datasets accepts
        yield from jsonl_rows(path)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # One broken bracket makes the whole list unreadable: this cannot be skipped row by row.
        raise LitPeftError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    for i, row in enumerate(data):
        yield f"{path} row {i}", row


# -- everything else, read through Hugging Face datasets ---------------------------------------------------
def datasets_rows(file: Path, load_kwargs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    datasets = require_datasets()
    kwargs: dict[str, Any] = {}
    if file.suffix in (".csv", ".tsv"):  # every column a string, as in the file ("42" stays "42")
        delimiter = "\t" if file.suffix == ".tsv" else load_kwargs.get("delimiter", ",")
        with open(file, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
        kwargs = {
            "delimiter": delimiter,
            "keep_default_na": False,
            "features": datasets.Features({c: datasets.Value("string") for c in header}),
        }
    kwargs.update(load_kwargs)
    try:
        ds = datasets.load_dataset(
            DATASETS_BUILDERS[file.suffix],
            data_files=str(file),
            split="train",
            cache_dir=str(cache_dir() / "data" / "hf"),
            **kwargs,
        )
    except Exception as e:  # datasets raises many types for unreadable files
        raise LitPeftError(f"{file}: cannot be read by datasets ({type(e).__name__}: {e})") from None
    for i, row in enumerate(ds):
        yield f"{file} row {i}", row


def hub_rows(
    spec: str, split: str = "train", reader: str = "auto", load_kwargs: dict[str, Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for every row of a hub dataset ``hub://org/name[@revision][/path]``.

    A path inside the repo (a file or folder) is read like a local one; a whole repo through
    ``datasets.load_dataset`` on its downloaded files, which finds its configs (``load_kwargs: {name:
    ...}``) and splits as the hub does; ``split`` picks one.
    """
    ref = hub.parse_dataset_id(spec)
    local = hub.download(ref, hub.dataset_patterns(ref, HUB_DATASET_FILES))
    if ref.path:
        local = local / ref.path
        if not local.exists():
            raise LitPeftError(f"{ref.what}: the repo has no file or folder '{ref.path}'")
        for file in data_files(local):
            yield from file_rows(file, reader, split, load_kwargs)
        return
    datasets = require_datasets()
    try:
        ds = datasets.load_dataset(
            str(local), split=split, cache_dir=str(cache_dir() / "data" / "hf"), **(load_kwargs or {})
        )
    except Exception as e:  # datasets raises many types (an unknown split or config is a ValueError)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LitPeftError(
            f"{ref.what} (split '{split}'): cannot be read by datasets ({first}); set "
            "data.source.init_args.split / val_split, or load_kwargs: {name: <config>}"
        ) from None
    for i, row in enumerate(ds):
        yield f"{ref} [{split}] row {i}", row


def saved_rows(directory: Path, split: str) -> Iterator[tuple[str, Any]]:
    datasets = require_datasets()
    ds = datasets.load_from_disk(str(directory))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LitPeftError(
                f"saved dataset '{directory}' has no split '{split}'; it has: {', '.join(ds)} "
                "(set data.source.init_args.split / val_split)"
            )
        ds, directory = ds[split], directory / split
    for i, row in enumerate(ds):
        yield f"{directory} row {i}", row


__all__ = [
    "DATASETS_BUILDERS",
    "HUB_DATASET_FILES",
    "SUFFIXES",
    "BadRow",
    "data_files",
    "datasets_rows",
    "file_rows",
    "hub_rows",
    "is_saved_dataset",
    "json_rows",
    "jsonl_rows",
    "require_datasets",
    "saved_rows",
]
