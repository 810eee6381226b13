"""Each source on small files written here: Alpaca (JSON, JSONL, column_map), OpenAI messages, ShareGPT,
Hugging Face datasets (save_to_disk, parquet, CSV, JSON through load_dataset), a directory, the split."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from litpeft.data import (
    Alpaca,
    AutoSource,
    Chat,
    DataSource,
    HFDataset,
    InstructionDataModule,
    LoadedData,
    ShareGPT,
    readers,
    sources,
)
from litpeft.data.sources import text_field
from litpeft.errors import LitPeftError


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_assistant(instruction: str, output: str, extra: str = "") -> list[dict[str, str]]:
    return [
        {"role": "user", "content": instruction, "input": extra},
        {"role": "assistant", "content": output},
    ]


ROWS = [
    {"instruction": "Add 2 and 3", "input": "", "output": "5"},
    {"instruction": "Repeat", "input": "abc", "output": "abc"},
]
EXPECTED = [user_assistant("Add 2 and 3", "5"), user_assistant("Repeat", "abc", "abc")]


def test_alpaca_jsonl_and_json(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(ROWS, indent=2))
    for path in (jsonl, as_list):
        loaded = Alpaca().load(path)
        assert isinstance(loaded, LoadedData)
        assert loaded.samples == EXPECTED
        assert loaded.rows == 2 and loaded.skipped == []


def test_old_names_still_import() -> None:
    with pytest.warns(FutureWarning, match=r"sources\.Loaded moved to litpeft\.data\.sources\.LoadedData"):
        from litpeft.data.sources import Loaded
    assert Loaded is LoadedData
    # storage moved to litpeft.data.readers; the names stay importable from sources
    assert sources.BadRow is readers.BadRow and sources.require_datasets is readers.require_datasets
    assert sources.SUFFIXES == readers.SUFFIXES and sources.is_saved_dataset is readers.is_saved_dataset


def test_alpaca_column_map_dolly(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Capital of France?", "context": "Geography", "response": "Paris", "category": "qa"}
    ]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    source = Alpaca(column_map={"input": "context", "output": "response"})
    assert source.load(path).samples == [user_assistant("Capital of France?", "Paris", "Geography")]


def test_alpaca_system_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "Hi", "output": "Hello", "system": "Be nice."}])
    assert Alpaca().load(path).samples == [
        [{"role": "system", "content": "Be nice."}, *user_assistant("Hi", "Hello")]
    ]


def test_alpaca_column_map_rejects_unknown_keys() -> None:
    with pytest.raises(LitPeftError, match=r"column_map has unknown keys \['answer'\]"):
        Alpaca(column_map={"answer": "response"})


def test_openai_messages_multi_turn(tmp_path: Path) -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "name": "bot"},  # extra keys are ignored
        {"role": "user", "content": [{"type": "text", "text": "Bye"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": "Ciao"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    assert Chat().load(path).samples == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye!"},
            {"role": "assistant", "content": "Ciao"},
        ]
    ]


def test_sharegpt(tmp_path: Path) -> None:
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"},
    ]
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    roles = ["system", "user", "assistant", "user", "assistant"]
    expected = [{"role": r, "content": c["value"]} for r, c in zip(roles, conv, strict=True)]
    assert ShareGPT().load(path).samples == [expected]
    # other speaker names through role_map
    path2 = write_jsonl(
        tmp_path / "sg2.jsonl",
        [{"conversations": [{"from": "me", "value": "Q"}, {"from": "bot", "value": "A"}]}],
    )
    samples = ShareGPT(role_map={"me": "user", "bot": "assistant"}).load(path2).samples
    assert samples == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]


def test_auto_source_tells_formats_apart_per_row(tmp_path: Path) -> None:
    rows = [
        ROWS[0],
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]
    samples = AutoSource().load(write_jsonl(tmp_path / "mixed.jsonl", rows)).samples
    assert samples == [
        EXPECTED[0],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]


# -- Hugging Face datasets ------------------------------------------------------------------------------
def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert AutoSource().load(tmp_path / "ds").samples == EXPECTED

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "dev": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    source = AutoSource(val_split="dev")
    assert source.load(tmp_path / "dd", "train").samples == EXPECTED
    assert source.load(tmp_path / "dd", "val").samples == EXPECTED[:1]
    with pytest.raises(LitPeftError, match=r"has no split 'validation'; it has: train, dev"):
        AutoSource().load(tmp_path / "dd", "val")


def test_parquet_csv_tsv_and_json_through_load_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text('instruction,input,output\n"Add 2 and 3",,5\nRepeat,abc,abc\n')
    (tmp_path / "d.tsv").write_text("instruction\tinput\toutput\nAdd 2 and 3\t\t5\nRepeat\tabc\tabc\n")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    for name in ("d.parquet", "d.csv", "d.tsv"):
        assert AutoSource().load(tmp_path / name).samples == EXPECTED, name
    # reader: datasets sends JSON through load_dataset("json", data_files=...) as well
    loaded = HFDataset().load(tmp_path / "d.jsonl")
    assert loaded.samples == EXPECTED


def test_directory_of_files(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "data"
    (d / "more").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", ROWS[:1])
    (d / "b.json").write_text(json.dumps(ROWS[1:]))
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(d / "more" / "c.parquet"))
    write_jsonl(d / ".hidden.jsonl", ROWS)  # ignored
    (d / "README.md").write_text("not data")  # ignored
    assert AutoSource().load(d).samples == [EXPECTED[0], EXPECTED[1], EXPECTED[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LitPeftError, match=r"data directory '.*empty' has no data files"):
        AutoSource().load(tmp_path / "empty")


def test_missing_path_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(LitPeftError, match=r"data file '.*nope.jsonl' does not exist"):
        AutoSource().load(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(LitPeftError, match=r"x.txt' has an unknown suffix"):
        AutoSource().load(tmp_path / "x.txt")


def test_datasets_missing_gives_install_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.csv").write_text("instruction,output\na,b\n")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LitPeftError, match=r"needs the 'datasets' package: pip install 'litpeft\[data\]'"):
        AutoSource().load(tmp_path / "d.csv")


# -- validation split -------------------------------------------------------------------------------------
def _split(path: Path, **kwargs: Any) -> tuple[list[Any], list[Any]]:
    dm = InstructionDataModule(str(path), **kwargs)
    dm.load_samples()
    return dm.train_samples, dm.val_samples


def test_validation_fraction_is_fixed_by_seed(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, val = _split(path, val_fraction=0.25, seed=1)
    assert len(val) == 10 and len(train) == 30
    everything = [m[0]["content"] for m in train + val]
    assert sorted(everything) == sorted(r["instruction"] for r in rows)  # disjoint, complete
    assert _split(path, val_fraction=0.25, seed=1) == (train, val)
    assert _split(path, val_fraction=0.25, seed=2)[1] != val


def test_separate_validation_file(tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    val_path = write_jsonl(tmp_path / "v.jsonl", ROWS[:1])
    assert _split(train_path, val_file=str(val_path)) == (EXPECTED, EXPECTED[:1])


def test_data_source_by_class_path_in_a_config(tmp_path: Path) -> None:
    """A user names a source by class_path, as in a YAML config (jsonargparse resolves it)."""
    from jsonargparse import ArgumentParser

    path = write_jsonl(
        tmp_path / "sg.jsonl",
        [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
    )
    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    cfg = parser.parse_object(
        {
            "data": {
                "train_file": str(path),
                "val_fraction": 0.0,
                "source": {
                    "class_path": "litpeft.data.ShareGPT",
                    "init_args": {"role_map": {"bot": "assistant"}},
                },
            }
        }
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm.source, ShareGPT) and dm.source.role_map["bot"] == "assistant"
    dm.load_samples()
    assert dm.train_samples == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]


class QA(DataSource):
    """A user's format, as in docs/data.md."""

    def to_messages(self, row: Any, where: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": text_field(row, "question", where)},
            {"role": "assistant", "content": text_field(row, "answer", where)},
        ]


def test_user_source_subclass(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q", "answer": "A"}, {"question": "Q2"}])
    with pytest.raises(LitPeftError, match=re.escape(f"{path}:2: field 'answer' is missing or empty")):
        QA().load(path)
    assert QA().load(path, skip_bad_rows=True).samples == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]


def test_hf_dataset_by_class_path_reads_through_datasets(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    rows = tmp_path / "x.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n')

    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    cfg = parser.parse_object(
        {"data": {"train_file": str(rows), "source": {"class_path": "litpeft.data.HFDataset"}}}
    )
    source = parser.instantiate_classes(cfg).data.source
    assert isinstance(source, HFDataset) and source.reader == "datasets"


def test_chat_rows_from_parquet_and_saved_sharegpt(tmp_path: Path) -> None:
    import datasets

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    expected = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    datasets.Dataset.from_list([{"messages": messages}]).to_parquet(str(tmp_path / "chat.parquet"))
    assert Chat().load(tmp_path / "chat.parquet").samples == expected
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    datasets.Dataset.from_list([{"conversations": conv}]).save_to_disk(str(tmp_path / "sg"))
    assert AutoSource().load(tmp_path / "sg").samples == expected
