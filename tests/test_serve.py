"""``litpeft serve``: a real server on 127.0.0.1 with two LoRA adapters on ``tiny:llama``, talked to
with the official ``openai`` client; and the pieces it is built of (shared-base models, detokenizer)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from adapter_helpers import REPO, make_adapter

from litpeft.cli import main
from litpeft.commands import generate
from litpeft.errors import LitPeftError
from litpeft.inference import load_for_inference
from litpeft.methods import HoulsbyAdapter, LlamaAdapterV2, LoRA, PrefixTuning, PromptTuning
from litpeft.models import tiny_tokenizer
from litpeft.serve.api import OpenAIEndpoints
from litpeft.serve.engine import Detokenizer, Job, generate_batch, make_job
from litpeft.serve.models import ServeSpec, load_served, parse_adapters, plan
from litpeft.serve.protocol import APIError
from litpeft.serve.server import adapter_flags, serve

BASE = "tiny:llama"
PROMPTS = ["Name a color.", "Count to three.", "Say hello.", "What is 2+2?", "Spell cat.", "Hi", "Why?", "ok"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters of the same base: ``a`` in the chat template's style, ``b`` in Alpaca's."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", BASE, LoRA(r=4), style="auto", seed=1),
        "b": make_adapter(root / "b", BASE, LoRA(r=4), style="alpaca", seed=2),
    }


@pytest.fixture(scope="module", autouse=True)
def server_process(
    request: pytest.FixtureRequest, adapters: dict[str, Path]
) -> Iterator[tuple[subprocess.Popen, str] | None]:
    """``litpeft serve`` in its own process group, started with the module (when a selected test needs
    it) so that it boots while the tests that need no server run."""
    here = [item for item in request.session.items if item.module is request.module]
    if not any("server" in item.fixturenames for item in here):
        yield None
        return
    port = free_port()
    cmd = [sys.executable, "-m", "litpeft", "serve", "--port", str(port), "--device", "cpu"]
    cmd += ["--max_batch_size", "8", "--batch_timeout", "0.02"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # workers outliving the graceful shutdown
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(server_process: tuple[subprocess.Popen, str] | None) -> str:
    """The base URL, once ``/health`` answers."""
    assert server_process is not None
    proc, url = server_process
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"ok":
                return url
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not start in 180 s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 10, **kw: Any) -> Any:
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


def streamed(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 10) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in chat(client, model, prompt, max_tokens, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def generated(capsys: pytest.CaptureFixture, **kwargs: Any) -> str:
    """What ``litpeft generate --prompt`` prints (run in process: the same code as the command)."""
    capsys.readouterr()
    generate(device="cpu", **kwargs)
    return capsys.readouterr().out.removesuffix("\n")


# -- the pieces ----------------------------------------------------------------------------------------
def test_adapter_flags_and_names() -> None:
    assert adapter_flags(["--adapter", "a=x", "--adapter=b=y", "--port", "1"]) == [
        "--adapter+", "a=x", "--adapter+=b=y", "--port", "1",
    ]  # fmt: skip
    assert parse_adapters(["a=x/1", "runs/dates/adapter"]) == {"a": "x/1", "adapter": "runs/dates/adapter"}
    with pytest.raises(LitPeftError, match="twice"):
        parse_adapters(["a=x", "a=y"])


def test_serve_checks_its_arguments_before_starting(tmp_path) -> None:
    for kwargs, match in [
        ({"model": BASE, "host": "10.0.0.1"}, "--host"),
        ({"model": BASE, "port": 80}, "--port"),
        ({"model": BASE, "max_batch_size": 0}, "positive"),
        ({"model": BASE, "batch_timeout": 0}, "positive"),
        ({}, "--model SPEC"),
        ({"adapter": [f"a={tmp_path / 'missing'}"]}, "does not exist"),
    ]:
        with pytest.raises(LitPeftError, match=match):
            serve(**kwargs)


def test_the_serve_command_is_registered_with_help_and_one_line_errors(capsys) -> None:
    main([])
    assert any(line.split()[:1] == ["serve"] for line in capsys.readouterr().out.splitlines())
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--adapter+ ADAPTER" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", BASE, "--host", "10.0.0.1"])
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith("litpeft: error: --host must be one of")
    )


def test_plan_takes_the_adapters_base_and_refuses_a_name_clash(adapters) -> None:
    spec = plan({"a": str(adapters["a"])}, None)
    assert (spec.base, spec.base_name, spec.names) == (BASE, BASE, [BASE, "a"])
    with pytest.raises(LitPeftError, match="also an adapter"):
        plan({"a": str(adapters["a"])}, None, base_name="a")


METHODS = {
    "lora": LoRA(r=4),
    "prompt": PromptTuning(num_virtual_tokens=4),
    "prefix": PrefixTuning(num_virtual_tokens=4),
    "llama_adapter_v2": LlamaAdapterV2(adapter_len=4, adapter_layers=1),
    "houlsby": HoulsbyAdapter(),
}


def test_adapters_share_the_base_tensors_and_each_answers_as_loaded_alone(tmp_path) -> None:
    """Each served adapter (a copy of the base sharing its tensors) gives the logits of the adapter
    loaded on its own, and the bare base stays the base: nothing one method does reaches another."""
    dirs = {n: make_adapter(tmp_path / n, BASE, m, seed=i) for i, (n, m) in enumerate(METHODS.items())}
    served = load_served(ServeSpec(BASE, "base", {n: str(d) for n, d in dirs.items()}), "cpu")
    base_weight = served["base"].model.get_input_embeddings().weight
    ids = torch.tensor([[5, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        plain = load_for_inference(None, BASE).model(ids).logits
        assert torch.equal(served["base"].model(ids).logits, plain)
        for name, d in dirs.items():
            model = served[name].model
            assert model.get_input_embeddings().weight.data_ptr() == base_weight.data_ptr()
            alone = load_for_inference(str(d), None).model(ids).logits
            torch.testing.assert_close(model(ids).logits, alone, rtol=0, atol=1e-6)
            assert not torch.allclose(alone, plain)


def run_batch(served: dict, jobs: list) -> list[dict[str, Any]]:
    """Each job's text, finish reason and token count (or error) from one ``generate_batch``."""
    out: list[dict[str, Any]] = [{"text": ""} for _ in jobs]
    for step in generate_batch(served, jobs):
        for row, item in zip(out, step, strict=True):
            row["text"] += item.get("text", "")
            row.update({k: v for k, v in item.items() if k != "text"})
    return out


def test_a_batch_generates_each_models_requests_together_and_each_as_alone(adapters, generate_calls) -> None:
    """One ``generate`` per model (rows of one adapter batched, left-padded), and every row's answer,
    stop and token count are those of the request served alone; a bad request fails on its own."""
    served = load_served(plan({n: str(d) for n, d in adapters.items()}, None), "cpu")
    specs = [("a", PROMPTS[0], 8, None), ("b", PROMPTS[1], 5, None), ("a", PROMPTS[2] * 3, 3, None),
             ("b", PROMPTS[3], 8, None), (BASE, PROMPTS[4], 6, None), ("a", PROMPTS[5], 8, ["e"])]  # fmt: skip
    requests = [
        {"model": m, "messages": [{"role": "user", "content": p}], "max_tokens": n, "temperature": 0.0,
         "top_p": 1.0, "stop": stop}
        for m, p, n, stop in specs
    ]  # fmt: skip
    too_long = {**requests[0], "messages": [{"role": "user", "content": "x" * 600}]}
    with pytest.raises(APIError) as e:
        make_job(served, too_long, 16)
    jobs = [make_job(served, r, 16) for r in requests] + [e.value]
    together = run_batch(served, jobs)
    assert sorted(ids.shape[0] for ids, _ in generate_calls) == [1, 2, 3]
    assert together[-1]["status"] == 400 and together[-1]["error"]["code"] == "context_length_exceeded"
    alone = [run_batch(served, [job])[0] for job in jobs[:-1]]
    assert together[:-1] == alone
    for row, (_, _, n, stop) in zip(alone, specs, strict=True):
        assert row["finish_reason"] == "stop" or row["completion_tokens"] == n
        assert row["text"] == row["full"] and (stop is None or stop[0] not in row["text"])


def test_the_api_key_is_checked() -> None:
    endpoints = OpenAIEndpoints(["m"], "m", api_key="secret")

    class Request:
        def __init__(self, header: str) -> None:
            self.headers = {"authorization": header}

    endpoints._authorize(Request("Bearer secret"))  # type: ignore[arg-type]
    with pytest.raises(APIError) as e:
        endpoints._authorize(Request("Bearer wrong"))  # type: ignore[arg-type]
    assert e.value.status == 401 and e.value.body()["error"]["code"] == "invalid_api_key"


def test_detokenizer_deltas_add_up_to_the_whole_text() -> None:
    tok = tiny_tokenizer()
    text = "héllo wörld, ça va? 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for stop in [None, ["ça"], ["zzz"]]:
        row = Detokenizer(tok, Job("m", [1], len(ids) + 1, 0.0, 1.0, stop))
        items = [row.add(t) for t in ids]
        if row.finish is None:
            items.append(row.add(tok.eos_token_id))
        deltas = "".join(i.get("text", "") for i in items)
        want = text[: text.find("ça")] if stop == ["ça"] else text
        assert deltas == want == items[-1]["full"]
        assert all("\ufffd" not in i.get("text", "") for i in items)  # no half characters on the way


# -- through the server --------------------------------------------------------------------------------
def test_models_lists_the_base_and_each_adapter(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "a", "b"]
    assert [getattr(m, "parent", None) for m in models] == [None, BASE, BASE]


def test_greedy_answers_equal_litpeft_generate(client, adapters, capsys) -> None:
    """Chat in each model's own prompt style (a: chat template, b: Alpaca, the base: its template) and
    a plain completion: the same text as ``litpeft generate``; the three models answer differently."""
    prompt = PROMPTS[0]
    answers = {}
    for name in ["a", "b", BASE]:
        where = {"model": BASE} if name == BASE else {"adapter": str(adapters[name])}
        out = chat(client, name, prompt, max_tokens=12)
        assert out.choices[0].message.content == generated(capsys, prompt=prompt, max_new_tokens=12, **where)
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
        assert out.model == name
        answers[name] = out.choices[0].message.content
        raw = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert raw.choices[0].text == generated(capsys, prompt=prompt, max_new_tokens=12, raw=True, **where)
    assert len(set(answers.values())) == 3


def test_streaming_yields_the_same_text(client: openai.OpenAI) -> None:
    for name in ["a", "b"]:
        for prompt in PROMPTS[:3]:
            whole = chat(client, name, prompt, max_tokens=16).choices[0]
            assert streamed(client, name, prompt, max_tokens=16) == (
                whole.message.content,
                whole.finish_reason,
            )
    raw = client.completions.create(model="a", prompt="Once", max_tokens=16, temperature=0).choices[0].text
    parts = client.completions.create(model="a", prompt="Once", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts if c.choices) == raw


def test_stream_usage_and_stop_strings(client: openai.OpenAI) -> None:
    chunks = list(chat(client, "a", "Hi", max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens > 0
    whole = chat(client, "b", "Say hello.", max_tokens=16).choices[0].message.content
    stop = whole[5:7]  # cut the answer where this first occurs
    cut = chat(client, "b", "Say hello.", max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == whole[: whole.find(stop)] and cut.finish_reason == "stop"
    assert streamed_with_stop(client, "b", "Say hello.", stop) == cut.message.content


def streamed_with_stop(client: openai.OpenAI, model: str, prompt: str, stop: str) -> str:
    stream = chat(client, model, prompt, max_tokens=16, stream=True, stop=[stop])
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_two_adapters_answer_differently_in_interleaved_requests_and_never_cross(client) -> None:
    alone = {(m, p): chat(client, m, p).choices[0].message.content for m in ["a", "b"] for p in PROMPTS[:4]}
    assert all(alone[("a", p)] != alone[("b", p)] for p in PROMPTS[:4])
    requests = [(m, p) for p in PROMPTS[:4] for m in ["a", "b"]] * 2  # a, b, a, b, ... at once
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: chat(client, *r).choices[0].message.content, requests))
    assert answers == [alone[r] for r in requests]


@pytest.mark.slow
def test_32_concurrent_clients_lose_and_mix_up_nothing(client: openai.OpenAI) -> None:
    cases = [(m, p) for m in ["a", "b", BASE] for p in PROMPTS]
    alone = {c: chat(client, *c, max_tokens=6).choices[0].message.content for c in cases}

    def one_client(k: int) -> list[tuple[tuple[str, str], str]]:
        out = []
        for j in range(3):
            case = cases[(7 * k + j) % len(cases)]
            if (k + j) % 2:
                text = streamed(client, *case, max_tokens=6)[0]
            else:
                text = chat(client, *case, max_tokens=6).choices[0].message.content
            out.append((case, text))
        return out

    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(one_client, range(32)) for r in rs]
    assert len(results) == 96
    assert [text for _, text in results] == [alone[case] for case, _ in results]


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client) -> None:
    long = "x" * 600  # 600 byte tokens: past tiny:llama's 512 positions
    cases = [
        (b'{"model": "a", "messages": [', 400, "invalid_json"),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": long}]}).encode(), 400, "context_length_exceeded"),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "a", "messages": [{"role": "user", "content": long}], "stream": True}).encode(), 400, "context_length_exceeded"),
    ]  # fmt: skip
    for body, status, code in cases:
        got, error = post(f"{server}/v1/chat/completions", body)
        assert got == status, error
        assert error["error"]["code"] == code and error["error"]["message"] and error["error"]["type"]
        assert chat(client, "a", "Hi", max_tokens=3).choices[0].message.content is not None  # still serving
    got, error = post(f"{server}/v1/completions", json.dumps({"model": "b", "prompt": long}).encode())
    assert got == 400 and error["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "c", "Hi")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "a", "Hi", max_tokens=-5)
    assert e.value.body["param"] == "max_tokens"
