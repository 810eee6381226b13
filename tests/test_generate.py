"""``litpeft generate``: one prompt, a batch from a JSONL file, and the interactive chat."""

from __future__ import annotations

import pytest
from adapter_helpers import make_adapter, read_jsonl, run_litpeft, write_jsonl
from transformers import GenerationMixin

from litpeft.commands import chat, generate, generate_batched, load
from litpeft.errors import LitPeftError
from litpeft.methods import LoRA


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("gen") / "adapter", "tiny:llama", LoRA(r=4))


@pytest.fixture
def generate_calls(monkeypatch):
    """Every ``model.generate`` call, as (the prompt batch's input_ids, the generated ids)."""
    calls = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((kwargs["input_ids"], out))
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


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
    loaded = load(str(adapter), None)
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
    tokenizer = load(None, "tiny:llama").tokenizer
    chatml, alpaca = (tokenizer.decode(ids[0]) for ids, _ in generate_calls)
    assert (
        chatml
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("### Response:\n")


def test_raw_prompt_and_base_model_alone(generate_calls, capsys) -> None:
    generate(model="tiny:llama", prompt="Once upon a time", raw=True, max_new_tokens=2)
    ((ids, _),) = generate_calls
    assert load(None, "tiny:llama").tokenizer.decode(ids[0]) == "Once upon a time"


def test_sampling_is_reproducible_with_a_seed(adapter, capsys) -> None:
    def sample(seed: int) -> str:
        generate(adapter=str(adapter), prompt="Hi", temperature=1.5, top_p=0.95, seed=seed, max_new_tokens=12)
        return capsys.readouterr().out

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first


def test_chat_keeps_the_history_and_streams(adapter, generate_calls, capsys) -> None:
    loaded = load(str(adapter), None)
    lines = iter(["What is a zebra?", "And a quagga?", "/reset", "Tell me about okapis."])

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

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
    loaded = load(str(adapter), None)
    limit = loaded.model.config.max_position_embeddings  # 512 byte tokens for tiny:llama
    lines = iter([f"first {'a' * 200}", f"second {'b' * 200}", f"third {'c' * 200}"])

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = chat(loaded, max_new_tokens=4, read=read, system="Be brief.")
    prompts = [ids[0] for ids, _ in generate_calls]
    assert all(len(p) + 4 <= limit for p in prompts)
    last = loaded.tokenizer.decode(prompts[-1])
    assert "Be brief." in last and "third" in last and "first" not in last
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert "dropped to fit the context" in capsys.readouterr().err


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
    loaded = load(str(adapter), None)
    prompt = loaded.style.generation_prompt([{"role": "user", "content": "Name a color."}], loaded.tokenizer)
    assert result.stdout == generate_batched(loaded, [prompt], 5, 1)[0] + "\n"


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
