"""Preference data: the row shapes in use, bad rows with file:line, the model's prompt style, truncation
that keeps the prompt, and hub datasets through the same source layer as instruction data."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_helpers import REPO, write_jsonl
from hub_server import HubServer, Repo
from test_hub import point_hub_at

from litpeft.errors import LitPeftError
from litpeft.loss import IGNORE_INDEX
from litpeft.models import tiny_tokenizer
from litpeft.preference.data import (
    DEMO_TRAIN,
    DEMO_VAL,
    PreferenceDataModule,
    PreferencePair,
    PreferenceSource,
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


EXPECTED = PreferencePair([user("What is 2+2?")], bot("4"), bot("5"))

SHAPES = {
    "strings": {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    "ultrafeedback": {
        "prompt": "What is 2+2?",
        "chosen": [user("What is 2+2?"), bot("4")],
        "rejected": [user("What is 2+2?"), bot("5")],
        "score_chosen": 9.0,
    },
    "trl_conversational": {"prompt": [user("What is 2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]},
    "hh_rlhf": {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5",
    },
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_row_shape_becomes_the_same_pair(shape: str) -> None:
    assert PreferenceSource().to_messages(SHAPES[shape], "f:1") == EXPECTED


def test_a_multi_turn_conversation_is_the_prompt_of_its_last_answer() -> None:
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 2 and 2.\n\nAssistant: 4",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 2 and 2.\n\nAssistant: 22",
    }
    pair = PreferenceSource().to_messages(row, "f:1")
    assert pair == PreferencePair([user("Hi"), bot("Hello!"), user("Add 2 and 2.")], bot("4"), bot("22"))


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing or empty"),
        (
            {"chosen": "a", "rejected": "b"},
            "field 'prompt' is missing (chosen/rejected hold only the answer)",
        ),
        (
            {"prompt": "q", "chosen": [user("q")], "rejected": "b"},
            "field 'chosen' must end with the assistant's answer",
        ),
        (
            {"chosen": [user("q"), bot("a")], "rejected": [user("other"), bot("b")]},
            "field 'rejected' differs from 'chosen' before its last turn",
        ),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a list of turns, got int"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, row: dict, problem: str) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [SHAPES["strings"], row])
    with pytest.raises(LitPeftError) as e:
        PreferenceDataModule(str(path))
    assert str(e.value) == f"{path}:2: {problem} (set data.skip_bad_rows: true to skip bad rows)"


def test_skip_bad_rows_keeps_the_good_ones(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [SHAPES["strings"], {"prompt": "q"}, SHAPES["hh_rlhf"]])
    data = PreferenceDataModule(str(path), skip_bad_rows=True, val_fraction=0.0)
    assert data.train_samples == [EXPECTED, EXPECTED]
    assert data.locations["train"] == [f"{path}:1", f"{path}:3"]


def _setup(path: Path, **kwargs) -> PreferenceDataModule:
    data = PreferenceDataModule(str(path), val_fraction=0.0, **kwargs)
    data.tokenizer = tiny_tokenizer()
    data.setup()
    return data


def test_both_sides_use_the_models_chat_template_and_only_the_last_answer_is_labelled(tmp_path: Path) -> None:
    """The tokens are the tokenizer's own chat-template rendering of each conversation."""
    row = {
        "prompt": [user("Hi"), bot("Hello!"), user("2+2?")],
        "chosen": [bot("4")],
        "rejected": [bot("five")],
    }
    data = _setup(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    tok = data.tokenizer
    chosen, rejected = data.train_data[0]
    for sample, answer in ((chosen, "4"), (rejected, "five")):
        conversation = [*row["prompt"], bot(answer)]
        assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(conversation, tokenize=False)
        labelled = sample["labels"][sample["labels"] != IGNORE_INDEX]
        assert tok.decode(labelled) == answer + "<|im_end|>"  # not "Hello!": an earlier turn is prompt


def test_truncation_keeps_the_prompt_cuts_the_answers_and_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"prompt": "Short?", "chosen": "yes", "rejected": "no"},
        {"prompt": "Long answer?", "chosen": "x" * 200, "rejected": "y" * 10},
        {"prompt": "p" * 200, "chosen": "a", "rejected": "b"},  # the prompt alone is too long
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="litpeft"):
        data = _setup(path, max_seq_length=64, prompt_style="plain")
    assert len(data.train_data) == 2
    chosen, rejected = data.train_data[1]
    tok = data.tokenizer
    assert len(chosen["input_ids"]) == 64 and tok.decode(chosen["input_ids"]).startswith("Long answer?\nxxx")
    assert (
        tok.decode(rejected["input_ids"]) == "Long answer?\n" + "y" * 10 + tok.eos_token
    )  # short side whole
    lines = [r.getMessage() for r in caplog.records if "preference data" in r.getMessage()]
    assert len(lines) == 1
    assert (
        "2 train / 0 val pairs; 1 with answers cut to max_seq_length=64 (prompt kept), 1 dropped" in lines[0]
    )
    with pytest.raises(LitPeftError, match=rf"^{path}:2: longer than data.max_seq_length=64 tokens"):
        _setup(path, max_seq_length=64, prompt_style="plain", truncation="error")
    assert len(_setup(path, max_seq_length=64, prompt_style="plain", truncation="drop").train_data) == 1


def test_a_batch_is_the_chosen_rows_then_the_rejected_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    data = _setup(write_jsonl(tmp_path / "pairs.jsonl", rows), batch_size=3, prompt_style="plain")
    b = next(iter(data.train_dataloader()))
    texts = [
        data.tokenizer.decode(ids[mask.bool()])
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]
    assert [t.split("\n")[1].split(" ")[0] for t in texts] == ["good"] * 3 + ["bad"] * 3
    assert [t.split("\n")[0] for t in texts[:3]] == [
        t.split("\n")[0] for t in texts[3:]
    ]  # pair i: rows i, i+3


def test_hub_datasets_are_read_through_the_same_source_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [SHAPES["ultrafeedback"], SHAPES["trl_conversational"]]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    server = HubServer(datasets={"org/prefs": Repo.from_files({"data/train_prefs.jsonl": body})}).start()
    try:
        point_hub_at(monkeypatch, server.url, tmp_path / "hf")
        monkeypatch.setenv("LITPEFT_CACHE", str(tmp_path / "litpeft-cache"))
        loaded = PreferenceSource().load("hub://org/prefs/data/train_prefs.jsonl")
    finally:
        server.stop()
    assert loaded.samples == [EXPECTED, EXPECTED]
    assert loaded.locations[1].endswith("data/train_prefs.jsonl:2")


def test_bundled_demo_pairs_regenerate_identically_and_differ_only_in_format(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_preference_data.py"), "--out", str(tmp_path)],
        check=True,
    )
    splits = {}
    for path in (DEMO_TRAIN, DEMO_VAL):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
        splits[path] = [json.loads(line) for line in path.read_text().splitlines()]
    for row in splits[DEMO_TRAIN] + splits[DEMO_VAL]:
        date = dt.date.fromisoformat(row["chosen"])
        assert row["rejected"] != row["chosen"]
        same = [
            d for f in ("%m/%d/%Y", "%d.%m.%Y", "%d/%m/%Y", "%m/%d/%y") if (d := _parse(row["rejected"], f))
        ]
        assert any((d.month, d.day, d.year % 100) == (date.month, date.day, date.year % 100) for d in same), (
            row
        )
    dates = [{r["chosen"] for r in splits[p]} for p in (DEMO_TRAIN, DEMO_VAL)]
    assert not dates[0] & dates[1]


def _parse(text: str, fmt: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, fmt)
    except ValueError:
        return None


def test_only_an_explicit_demo_trains_on_the_bundled_pairs() -> None:
    with pytest.raises(LitPeftError, match="data.train_file is not set"):
        PreferenceDataModule()
    assert PreferenceDataModule("demo").train_file.endswith("preference_train.jsonl")
