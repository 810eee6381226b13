"""``litpeft.inference``: loading for inference, prompts from files, batched generation, the chat REPL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from litpeft.data.prompts import get_style
from litpeft.errors import LitPeftError
from litpeft.evaluation import ExactMatchEvaluation
from litpeft.inference import (
    chat,
    generate,
    load_for_inference,
    parse_device,
    parse_dtype,
    row_messages,
    sampling_options,
    split_for_generation,
)
from litpeft.methods import LoRA
from litpeft.models import load_model, load_tokenizer
from litpeft.module import PeftLM


@pytest.fixture(scope="module")
def adapter(tiny_lora_adapter):
    return tiny_lora_adapter


def _lines(*texts: str):
    lines = iter(texts)

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    return read


# -- loading ----------------------------------------------------------------------------------------
def test_load_a_base_or_an_adapter(adapter) -> None:
    base = load_for_inference(None, "tiny:llama", dtype="bfloat16")
    assert base.method is None and base.adapter is None and base.base == "tiny:llama"
    assert base.model.dtype == torch.bfloat16 and not base.model.training
    tuned = load_for_inference(str(adapter), None)
    assert tuned.method is not None and tuned.method.name == "lora" and tuned.adapter == str(adapter)
    assert "### Instruction:\nHi" in tuned.prompt([{"role": "user", "content": "Hi"}])  # saved: alpaca
    with pytest.raises(LitPeftError, match="give --adapter"):
        load_for_inference(None, None)


def test_dtype_and_device_parsing() -> None:
    assert parse_dtype(None) is None and parse_dtype("float16") == torch.float16
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# -- prompts from files -----------------------------------------------------------------------------
def test_prompt_rows_accept_every_training_format_without_an_answer() -> None:
    user = {"role": "user", "content": "Hi?"}
    assert row_messages({"prompt": "Hi?"}, "f:1") == [user]
    assert row_messages({"conversations": [{"from": "human", "value": "Hi?"}]}, "f:2") == [user]
    assert row_messages({"messages": [user]}, "f:3") == [user]
    assert row_messages({"instruction": "Hi?"}, "f:4") == [{**user, "input": ""}]
    assert row_messages({"instruction": "Hi?", "output": "Yo"}, "f:5")[-1] == {
        "role": "assistant",
        "content": "Yo",
    }
    with pytest.raises(LitPeftError, match=r"f:6: field 'messages\[0\].role' has unknown role 'bot'"):
        row_messages({"messages": [{"role": "bot", "content": "x"}]}, "f:6")
    with pytest.raises(LitPeftError, match="f:7: field 'instruction' is missing or empty"):
        row_messages({"text": "no known field"}, "f:7")


def test_split_for_generation_uses_the_last_assistant_turn() -> None:
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    prompts, refs = split_for_generation([msgs])
    assert prompts == [msgs[:3]] and refs == ["a2"]
    # A reference is needed: a trailing user turn is cut back to the last assistant turn.
    assert split_for_generation([msgs[:3]]) == ([msgs[:1]], ["a1"])
    with pytest.raises(LitPeftError, match="no assistant turn"):
        split_for_generation([msgs[:1]])


def test_split_for_generation_without_a_reference_answers_open_conversations() -> None:
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert split_for_generation([msgs, msgs[:2], msgs[:1]], need_reference=False) == (
        [msgs, msgs[:1], msgs[:1]],
        [None, "a1", None],
    )


# -- generation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (0.0, 1.0, {"do_sample": False}),
        (0.0, 0.5, {"do_sample": False}),
        (0.7, 0.9, {"do_sample": True, "temperature": 0.7, "top_p": 0.9}),
    ],
)
def test_sampling_options(temperature, top_p, expected) -> None:
    assert sampling_options(temperature, top_p) == expected


@pytest.mark.parametrize(
    ("temperature", "top_p", "message"), [(-1.0, 1.0, "--temperature"), (1.0, 0.0, "--top_p")]
)
def test_bad_sampling_options(temperature, top_p, message) -> None:
    with pytest.raises(LitPeftError, match=message):
        sampling_options(temperature, top_p)


def test_batched_left_padded_generation_equals_one_by_one() -> None:
    tok, model = load_tokenizer("tiny:llama"), load_model("tiny:llama")
    prompts = ["a", "a much longer prompt here", "mid length"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_generation_batches_prompts_longest_first_and_answers_in_input_order(generate_calls) -> None:
    tok, model = load_tokenizer("tiny:llama"), load_model("tiny:llama")
    model.train()
    prompts = ["bb", "dddd", "a", "ccc", "eeeee"]
    texts = generate(model, tok, prompts, max_new_tokens=3, batch_size=2)
    batches = [[tok.decode(row, skip_special_tokens=True) for row in ids] for ids, _ in generate_calls]
    assert batches == [["eeeee", "dddd"], ["ccc", "bb"], ["a"]]  # similar lengths share a batch
    assert texts == [generate(model, tok, [p], max_new_tokens=3, batch_size=1)[0] for p in prompts]
    assert model.training  # restored
    generate_calls.clear()
    generate(model, tok, prompts, max_new_tokens=3, batch_size=2, longest_first=False)
    batches = [[tok.decode(row, skip_special_tokens=True) for row in ids] for ids, _ in generate_calls]
    assert batches == [["bb", "dddd"], ["a", "ccc"], ["eeeee"]]  # the input order, as the callback uses


def test_the_exact_match_callback_batches_in_the_validation_order(generate_calls) -> None:
    """Its figures (the demo's) were measured with batches in the validation order: keep that batching."""
    callback = ExactMatchEvaluation(batch_size=2)
    module = PeftLM("tiny:llama", method=LoRA(r=2))
    module.configure_model()
    samples = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": "x"}] for t in ("bb", "dddd", "a")
    ]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_samples=samples, style=get_style("plain")))
    callback._evaluate(trainer, module)
    batches = [
        [module.tokenizer.decode(row, skip_special_tokens=True) for row in ids] for ids, _ in generate_calls
    ]
    assert [len(b) for b in batches] == [2, 1]
    assert "bb" in batches[0][0] and "dddd" in batches[0][1] and "a" in batches[1][0]


# -- the chat REPL ----------------------------------------------------------------------------------
def test_chat_keeps_the_history_and_streams(adapter, generate_calls, capsys) -> None:
    loaded = load_for_inference(str(adapter), None)
    read = _lines("What is a zebra?", "And a quagga?", "/reset", "Tell me about okapis.")
    history = chat(loaded, max_new_tokens=4, read=read)
    assert [m["role"] for m in history] == ["user", "assistant"]  # after /reset: the last exchange only
    prompts = [loaded.tokenizer.decode(ids[0]) for ids, _ in generate_calls]
    assert len(prompts) == 3
    assert "zebra" in prompts[1] and "quagga" in prompts[1]  # second turn sees the first
    assert "zebra" not in prompts[2] and "okapis" in prompts[2]
    streamed = capsys.readouterr().out
    replies = [
        loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for ids, out in generate_calls
    ]
    assert streamed == "".join(r + "\n" for r in replies)


def test_chat_drops_the_oldest_exchange_when_the_context_is_full(adapter, generate_calls, capsys) -> None:
    loaded = load_for_inference(str(adapter), None)
    limit = loaded.model.config.max_position_embeddings  # 512 byte tokens for tiny:llama
    read = _lines(f"first {'a' * 200}", f"second {'b' * 200}", f"third {'c' * 200}")
    history = chat(loaded, max_new_tokens=4, read=read, system="Be brief.")
    prompts = [ids[0] for ids, _ in generate_calls]
    assert all(len(p) + 4 <= limit for p in prompts)
    last = loaded.tokenizer.decode(prompts[-1])
    assert "Be brief." in last and "third" in last and "first" not in last
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert "dropped to fit the context" in capsys.readouterr().err
