"""``litpeft generate``: one prompt, a batch from a JSONL file, and the interactive chat (the REPL itself:
tests/test_inference.py)."""

from __future__ import annotations

import pytest
from adapter_helpers import make_adapter, read_jsonl, run_litpeft, write_jsonl

from litpeft.commands import generate
from litpeft.errors import LitPeftError
from litpeft.inference import generate as generate_texts
from litpeft.inference import load_for_inference
from litpeft.methods import LoRA


@pytest.fixture(scope="module")
def adapter(tiny_lora_adapter):
    return tiny_lora_adapter


def twenty_rows() -> list[dict]:
    rows = []
    for i in range(20):
        if i % 3 == 0:
            rows.append({"id": i, "instruction": f"Add {i} and {i}.", "output": str(2 * i)})
        elif i % 3 == 1:
            rows.append({"id": i, "messages": [{"role": "user", "content": f"Count to {i}." + " Go." * i}]})
        else:
            rows.append({"id": i, "instruction": "Repeat the input.", "input": "ab" * i})
    return rows


def test_jsonl_batch_is_generated_in_batches_in_input_order(adapter, tmp_path, generate_calls) -> None:
    rows = twenty_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    generate(
        adapter=str(adapter),
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out.jsonl"),
        batch_size=8,
        max_new_tokens=4,
    )
    assert [ids.shape[0] for ids, _ in generate_calls] == [8, 8, 4]  # 20 prompts, three batched calls
    batched = read_jsonl(tmp_path / "out.jsonl")
    assert [{k: v for k, v in r.items() if k != "generated"} for r in batched] == rows
    # Left-padded prompts of different lengths in one batch: the same greedy answers as one by one.
    generate_calls.clear()
    generate(
        adapter=str(adapter),
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "one.jsonl"),
        batch_size=1,
        max_new_tokens=4,
    )
    assert len(generate_calls) == 20
    assert [r["generated"] for r in read_jsonl(tmp_path / "one.jsonl")] == [r["generated"] for r in batched]


def test_prompt_uses_the_adapters_prompt_style(adapter, generate_calls, capsys) -> None:
    loaded = load_for_inference(str(adapter), None)
    generate(adapter=str(adapter), prompt="Name a color.", max_new_tokens=3)
    ((ids, out),) = generate_calls
    tokenizer = loaded.tokenizer
    assert tokenizer.decode(ids[0]) == loaded.style.generation_prompt(
        [{"role": "user", "content": "Name a color."}], tokenizer
    )
    assert "### Instruction:\nName a color." in tokenizer.decode(ids[0])  # the adapter was saved with alpaca
    assert (
        capsys.readouterr().out == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    )


def test_saved_chat_template_style_and_override(tmp_path, generate_calls, capsys) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=2), style="chat_template")
    generate(adapter=str(adapter), prompt="Hi", system="Be brief.", max_new_tokens=1)
    generate(adapter=str(adapter), prompt="Hi", prompt_style="alpaca", max_new_tokens=1)
    tokenizer = load_for_inference(None, "tiny:llama").tokenizer
    chatml, alpaca = (tokenizer.decode(ids[0]) for ids, _ in generate_calls)
    assert (
        chatml
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("### Response:\n")


def test_raw_prompt_and_base_model_alone(generate_calls, capsys) -> None:
    generate(model="tiny:llama", prompt="Once upon a time", raw=True, max_new_tokens=2)
    ((ids, _),) = generate_calls
    assert load_for_inference(None, "tiny:llama").tokenizer.decode(ids[0]) == "Once upon a time"


def test_sampling_is_reproducible_with_a_seed(adapter, capsys) -> None:
    def sample(seed: int) -> str:
        generate(adapter=str(adapter), prompt="Hi", temperature=1.5, top_p=0.95, seed=seed, max_new_tokens=12)
        return capsys.readouterr().out

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input": "x.jsonl"}, "--input needs --output"),
        ({"output": "x.jsonl"}, "--output needs --input"),
        ({"prompt": "a", "temperature": -1.0}, "--temperature"),
        ({"prompt": "a", "temperature": 1.0, "top_p": 0.0}, "--top_p"),
        ({"prompt": "a", "model": None}, "give --adapter"),
    ],
)
def test_bad_options(kwargs, message) -> None:
    with pytest.raises(LitPeftError, match=message):
        generate(**kwargs)


def test_generate_cli_prompt_in_a_subprocess(adapter) -> None:
    result = run_litpeft(
        "generate", "--adapter", str(adapter), "--prompt", "Name a color.", "--max_new_tokens", "5"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_for_inference(str(adapter), None)
    prompt = loaded.style.generation_prompt([{"role": "user", "content": "Name a color."}], loaded.tokenizer)
    assert result.stdout == generate_texts(loaded.model, loaded.tokenizer, [prompt], 5, 1)[0] + "\n"


def test_generate_cli_jsonl_with_a_config_file(adapter, tmp_path) -> None:
    write_jsonl(tmp_path / "in.jsonl", twenty_rows())
    (tmp_path / "generate.yaml").write_text(
        f"adapter: {adapter}\ninput: {tmp_path / 'in.jsonl'}\noutput: {tmp_path / 'out.jsonl'}\n"
        "max_new_tokens: 3\nbatch_size: 10\n"
    )
    result = run_litpeft("generate", "--config", str(tmp_path / "generate.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == list(range(20)) and all("generated" in r for r in out)


def test_generate_cli_chat_reads_stdin(adapter) -> None:
    result = run_litpeft(
        "generate",
        "--adapter",
        str(adapter),
        "--max_new_tokens",
        "3",
        stdin="Hello there\n/reset\nAgain\n/exit\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "/reset clears the history" in result.stderr
    assert result.stdout.count(">> ") == 4  # four lines read (two answers streamed between them)
