"""``litpeft evaluate``: loss, perplexity, token accuracy, exact match and ROUGE-L on a validation file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from adapter_helpers import make_adapter, read_jsonl, run_litpeft, write_jsonl

from litpeft.adapter_dir import load_adapter
from litpeft.commands import evaluate, generate
from litpeft.data.collate import encode
from litpeft.errors import LitPeftError
from litpeft.methods import LoRA
from tests.test_evaluation import rouge_l_reference

VAL = [
    {"instruction": "Add 2 and 3.", "output": "5"},
    {"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("eval") / "adapter", "tiny:llama", LoRA(r=4))


def test_token_metrics_match_a_per_sample_reference(adapter, tmp_path) -> None:
    write_jsonl(tmp_path / "val.jsonl", VAL)
    summary = evaluate(str(tmp_path / "val.jsonl"), adapter=str(adapter), generation=False, batch_size=3)

    # Reference: each sample alone (no padding), loss = -mean log p(answer token | prefix) over all
    # answer tokens of all samples, accuracy = share of answer tokens that are the argmax.
    model, tokenizer, _, style = load_adapter(adapter)
    nll, hits, count = 0.0, 0, 0
    for row in VAL:
        if "instruction" in row:
            messages = [
                {"role": "user", "content": row["instruction"], "input": row.get("input", "")},
                {"role": "assistant", "content": row["output"]},
            ]
        elif "messages" in row:
            messages = row["messages"]
        else:
            messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
        sample = encode(messages, style, tokenizer)
        ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for t in range(1, len(labels)):
            if labels[t] != -100:
                nll -= logprobs[t - 1, labels[t]].item()
                hits += int(logprobs[t - 1].argmax() == labels[t])
                count += 1
    assert summary["tokens"] == count
    assert summary["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert summary["token_accuracy"] == pytest.approx(hits / count)
    assert "exact_match" not in summary


def test_exact_match_and_rouge_against_the_models_own_answers(adapter, tmp_path) -> None:
    prompts = [{"instruction": f"Write the number {i} in words."} for i in range(6)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    generate(
        adapter=str(adapter),
        input=str(tmp_path / "prompts.jsonl"),
        output=str(tmp_path / "answers.jsonl"),
        max_new_tokens=6,
    )
    answers = [r["generated"] for r in read_jsonl(tmp_path / "answers.jsonl")]
    # Half the references are the model's own greedy answers, half are something else.
    val = [
        {**p, "output": a if i % 2 == 0 else "a different answer"}
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    write_jsonl(tmp_path / "val.jsonl", val)
    summary = evaluate(
        str(tmp_path / "val.jsonl"),
        adapter=str(adapter),
        max_new_tokens=6,
        predictions=str(tmp_path / "pred.jsonl"),
    )
    assert summary["exact_match"] == pytest.approx(0.5)
    refs = [v["output"] for v in val]
    assert summary["rougeL"] == pytest.approx(
        sum(rouge_l_reference(a, r) for a, r in zip(answers, refs, strict=True)) / len(refs), abs=1e-6
    )
    predictions = read_jsonl(tmp_path / "pred.jsonl")
    assert [p["generated"] for p in predictions] == answers and [p["reference"] for p in predictions] == refs
    written = json.loads((adapter / "eval-val.json").read_text())  # next to the adapter by default
    assert written == summary


def test_rows_without_a_reference_are_refused(adapter, tmp_path) -> None:
    write_jsonl(tmp_path / "val.jsonl", [VAL[0], {"instruction": "no answer here"}])
    with pytest.raises(LitPeftError, match=r"val.jsonl:2: needs a reference answer"):
        evaluate(str(tmp_path / "val.jsonl"), adapter=str(adapter))


def test_evaluate_cli_in_a_subprocess(adapter, tmp_path) -> None:
    write_jsonl(tmp_path / "val.jsonl", VAL)
    out = tmp_path / "results" / "summary.json"
    result = run_litpeft(
        "evaluate", "--adapter", str(adapter), "--data", str(tmp_path / "val.jsonl"), "--output", str(out),
        "--max_new_tokens", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert json.loads(result.stdout) == summary
    assert summary["samples"] == 4 and summary["adapter"] == str(adapter)
    for key in ("loss", "perplexity", "token_accuracy", "exact_match", "rougeL"):
        assert isinstance(summary[key], float), key
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))
