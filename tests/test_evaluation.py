"""``litpeft.evaluation``: answer-token metrics, exact match, ROUGE-L and the exact-match callback."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from adapter_helpers import make_adapter

from litpeft import InstructionDataModule, LoRA, PeftLM
from litpeft.data.collate import encode
from litpeft.errors import LitPeftError
from litpeft.evaluation import ExactMatchEvaluation, exact_match, generation_metrics, rouge_l, token_metrics
from litpeft.inference import generate, load_for_inference
from litpeft.methods import PrefixTuning, PromptTuning
from tests.conftest import word_rows, write_jsonl

CONVERSATIONS = [
    [{"role": "user", "content": "Add 2 and 3.", "input": ""}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "hi hi"},
    ],
]


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l_reference(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R), on lowercased [a-z0-9]+ words."""
    pred, ref = (re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in (prediction, reference))
    lcs = _lcs(pred, ref)
    if not lcs:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


# -- answer-token metrics ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method", [PromptTuning(num_virtual_tokens=4), PrefixTuning(num_virtual_tokens=4)], ids=lambda m: m.name
)
def test_token_metrics_of_a_virtual_token_method_match_a_per_sample_reference(method, tmp_path) -> None:
    """Virtual positions carry no loss: the metrics are those of the real tokens, however batched."""
    loaded = load_for_inference(str(make_adapter(tmp_path / "adapter", "tiny:llama", method)), None)
    nll, hits, count = 0.0, 0, 0
    for messages in CONVERSATIONS:
        sample = encode(messages, loaded.style, loaded.tokenizer)
        ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0, -ids.shape[1] :]  # the real positions
        logprobs = torch.log_softmax(logits.float(), -1)
        for t in range(1, len(labels)):
            if labels[t] != -100:
                nll -= logprobs[t - 1, labels[t]].item()
                hits += int(logprobs[t - 1].argmax() == labels[t])
                count += 1
    for batch_size in (1, 3):
        metrics = token_metrics(
            loaded.model, loaded.tokenizer, loaded.style, CONVERSATIONS, batch_size=batch_size
        )
        assert metrics["tokens"] == count
        assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert metrics["token_accuracy"] == pytest.approx(hits / count)


def test_token_metrics_need_an_answer_token_within_the_length() -> None:
    loaded = load_for_inference(None, "tiny:llama")
    with pytest.raises(LitPeftError, match="no sample has answer tokens within max_seq_length"):
        token_metrics(loaded.model, loaded.tokenizer, loaded.style, CONVERSATIONS[:1], max_seq_length=4)


# -- generated answers against references -----------------------------------------------------------
def test_exact_match_normalizes_whitespace_only() -> None:
    assert exact_match([" Paris\n", "paris", "Rome  is"], ["Paris", "Paris", "Rome is"]) == 2 / 3
    assert math.isnan(exact_match([], []))


def test_rouge_l_is_the_lcs_f1() -> None:
    preds = [
        "the cat sat on the mat",
        "Hello, World!",
        "a b c d e",
        "nothing in common",
        "police killed the gunman",
    ]
    refs = ["the cat is on the mat", "hello world", "e d c b a", "xyz", "the gunman killed police"]
    expected = sum(rouge_l_reference(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)
    assert rouge_l(preds, refs) == pytest.approx(expected, abs=1e-6)
    assert rouge_l(["same words here"], ["Same words, here."]) == pytest.approx(1.0)


def test_rouge_l_needs_no_nltk(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)  # any `import nltk` now fails
    assert rouge_l(["a b c"], ["a c"]) == pytest.approx(0.8)  # LCS 2: P 2/3, R 1


def test_generation_metrics_score_greedy_answers_to_the_last_assistant_turn() -> None:
    loaded = load_for_inference(None, "tiny:llama")
    prompts = [loaded.prompt(m[:-1]) for m in CONVERSATIONS]
    answers = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=4)
    # The first reference is the model's own greedy answer, the others are not.
    conversations = [
        CONVERSATIONS[0][:-1] + [{"role": "assistant", "content": answers[0]}],
        *CONVERSATIONS[1:],
    ]
    metrics, preds, refs = generation_metrics(loaded, conversations, max_new_tokens=4, batch_size=2)
    assert preds == answers and refs == [answers[0], "Paris", "hi hi"]
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["rougeL"] == pytest.approx(
        sum(rouge_l_reference(p, r) for p, r in zip(preds, refs, strict=True)) / 3, abs=1e-6
    )


# -- during training --------------------------------------------------------------------------------
def test_exact_match_callback_reports_base_then_tuned(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", word_rows(12))
    callback = ExactMatchEvaluation(limit=4, max_new_tokens=4)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    module = PeftLM(model="tiny:llama", method=LoRA(r=2))
    trainer.fit(module, InstructionDataModule(train_file=str(data), val_fraction=0.5, batch_size=2))
    assert set(callback.results) == {"base", "tuned"}
    assert all(0.0 <= v <= 1.0 for v in callback.results.values())
    assert not any(p.requires_grad is False and ".lora_" in n for n, p in module.named_parameters())
    assert torch.is_grad_enabled()
