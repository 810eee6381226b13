"""``litpeft evaluate --tasks``: lm-evaluation-harness on base + adapter, checked against lm-eval's own HF
model (``HFLM``) on the merged adapter and against a hand computation for prompt tuning.

The tasks are local YAML files on bundled JSONL data (tests/lm_eval_tasks/; their ``data_files`` are
relative to the repository root, where these tests run them): no hub is reachable here.
"""

from __future__ import annotations

import json
import sys

import datasets
import pytest
import torch
from adapter_helpers import REPO, main_error, make_adapter
from lm_eval import evaluator
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import litpeft
from litpeft import export
from litpeft.adapter_dir import read_adapter_weights
from litpeft.cli import main
from litpeft.harness import HarnessLM
from litpeft.inference import load_for_inference
from litpeft.methods import LoRA, PromptTuning
from litpeft.models import load_model, load_tokenizer

TASKS = REPO / "tests" / "lm_eval_tasks"


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory):
    """A LoRA adapter of tiny:llama, loaded unmerged (litpeft) and merged by litpeft (for HFLM)."""
    adapter = make_adapter(tmp_path_factory.mktemp("harness") / "adapter", "tiny:llama", LoRA(r=4))
    ours = load_for_inference(str(adapter), None, "float32", "cpu")
    other = load_for_inference(str(adapter), None, "float32", "cpu")
    merged = export.merge(other.model, other.method)
    return adapter, ours, merged


def test_scores_and_generations_match_lm_evals_hf_model_on_the_merged_adapter(lora) -> None:
    _, loaded, merged = lora
    ours = HarnessLM(loaded, batch_size=3)
    ours.max_length = 40  # short windows: truncation and several rolling windows on short texts
    theirs = HFLM(pretrained=merged, tokenizer=loaded.tokenizer, batch_size=3, max_length=40)

    pairs = requests(
        "loglikelihood",
        ("Question: what color is the sky?\nAnswer:", " blue"),
        ("", "an empty context"),  # conditioned on the prefix token
        ("x" * 70, " cut from the left"),  # longer than the context
        ("The cat", " sat on the mat."),
    )
    for (lp, greedy), (ref_lp, ref_greedy) in zip(
        ours.loglikelihood(pairs), theirs.loglikelihood(pairs), strict=True
    ):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy

    # continuations the merged model decodes greedily (is_greedy true), and ones it does not
    context = loaded.tokenizer.encode("Reverse the word: apple")
    ids = torch.tensor([context])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, merged(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    greedy_cont = ids[0, len(context) :].tolist()
    tokens = [(None, context, greedy_cont), (None, context, greedy_cont[:1]), (None, context, [65, 66])]
    scored, reference = ours._loglikelihood_tokens(tokens), theirs._loglikelihood_tokens(tokens)
    assert [g for _, g in scored] == [g for _, g in reference] == [True, True, False]
    assert [lp for lp, _ in scored] == pytest.approx([lp for lp, _ in reference], abs=1e-4)

    # not a repeated phrase: HFLM's logits cache mixes up windows whose tokens repeat (lm-eval 0.4.13)
    long_text = " ".join(f"word {i} of {i * 7 % 13}" for i in range(12))
    texts = requests("loglikelihood_rolling", ("short text",), (long_text,))
    assert ours.loglikelihood_rolling(texts) == pytest.approx(theirs.loglikelihood_rolling(texts), abs=1e-4)

    settings = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    prompts = requests("generate_until", *[(c, settings) for c in ["Hello", "Reverse: abc\nAnswer:", "zz"]])
    assert ours.generate_until(prompts) == theirs.generate_until(prompts)


def test_prompt_tuning_scores_match_a_hand_computation(tmp_path) -> None:
    """The virtual tokens are in the model, not in the scored positions: log p(continuation) is the base
    model's on [prompt embeddings; token embeddings] (Lester et al. 2021), its positions numbered 0..N+L-1."""
    n = 4
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", PromptTuning(num_virtual_tokens=n))
    lm = HarnessLM(load_for_inference(str(adapter), None, "float32", "cpu"), batch_size=2)
    assert lm.max_length == 512 - n - 1  # tiny:llama's 512 positions, less the virtual tokens

    tokenizer = load_tokenizer("tiny:llama")
    base = load_model("tiny:llama", tokenizer=tokenizer).eval()
    (table,) = [v for k, v in read_adapter_weights(adapter).items() if k.endswith("embedding.weight")]

    def reference(context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = torch.tensor([context + continuation])
        embeds = torch.cat([table[None].float(), base.get_input_embeddings()(ids)], dim=1)
        with torch.no_grad():
            logprobs = base(inputs_embeds=embeds).logits[0, n:].float().log_softmax(-1)
        rows = logprobs[len(context) - 1 : len(ids[0]) - 1]
        target = torch.tensor(continuation)
        return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())

    pairs = [
        (tokenizer.encode("Question: 2+2?\nAnswer:"), tokenizer.encode(" 4")),
        (tokenizer.encode("Say hi."), tokenizer.encode(" hi there")),
        (tokenizer.encode("A"), tokenizer.encode("BCDEFG")),
    ]
    scored = lm._loglikelihood_tokens([(None, c, k) for c, k in pairs])
    for (lp, greedy), (c, k) in zip(scored, pairs, strict=True):
        ref_lp, ref_greedy = reference(c, k)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy


def test_a_quantized_base_is_scored_as_its_own_forward_computes(tmp_path) -> None:
    """QLoRA (nf4 base + LoRA), unmerged: the scores are the loaded model's own logits'."""
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=4), quantize="nf4")
    loaded = load_for_inference(str(adapter), None, None, "cpu")
    tokenizer = loaded.tokenizer
    pairs = [(tokenizer.encode("Hello there"), tokenizer.encode(" world")), ([65], tokenizer.encode("BCD"))]
    scored = HarnessLM(loaded, batch_size=2)._loglikelihood_tokens([(None, c, k) for c, k in pairs])
    for (lp, _), (context, continuation) in zip(scored, pairs, strict=True):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([context + continuation])).logits[0]
        rows = logits[len(context) - 1 : -1].float().log_softmax(-1)
        assert lp == pytest.approx(float(rows.gather(1, torch.tensor(continuation)[:, None]).sum()), abs=1e-4)


def test_cli_writes_lm_evals_results_next_to_the_adapter(lora, monkeypatch, capsys) -> None:
    adapter, loaded, merged = lora
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    group = str(TASKS / "litpeft_tasks.yaml")  # the group of the two tasks there
    main(["evaluate", "--adapter", str(adapter), "--tasks", group]
         + ["--limit", "5", "--num_fewshot", "1", "--batch_size", "4"])  # fmt: skip
    assert "litpeft_multiple_choice" in capsys.readouterr().out  # lm-eval's table

    results = json.loads((adapter / "lm_eval-litpeft_tasks.json").read_text())
    assert results["group_subtasks"]["litpeft_tasks"] == ["litpeft_multiple_choice", "litpeft_reverse"]
    assert results["n-shot"]["litpeft_multiple_choice"] == results["n-shot"]["litpeft_reverse"] == 1
    assert results["config"]["adapter"] == str(adapter)
    assert results["config"]["method"]["class_path"].endswith("LoRA")

    reference = evaluator.simple_evaluate(
        model=HFLM(pretrained=merged, tokenizer=loaded.tokenizer, batch_size=4, max_length=511),
        tasks=[str(TASKS / "multiple_choice.yaml"), str(TASKS / "reverse.yaml")],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        num_fewshot=1,
        limit=5,
        log_samples=False,
    )
    for task, metrics in reference["results"].items():
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in metrics:
                assert results["results"][task][metric] == pytest.approx(metrics[metric]), (task, metric)
                assert results["results"][task]["sample_len"] == 5


def test_bad_tasks_fail_with_one_line(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    run = ["evaluate", "--model", "tiny:llama"]
    assert "--data FILE" in main_error(capsys, *run)
    assert "--data FILE" in main_error(capsys, *run, "--data", "val.jsonl", "--tasks", "arc_easy")
    assert "does not exist" in main_error(capsys, *run, "--tasks", str(tmp_path / "nope.yaml"))
    assert "--num_fewshot must be >= 0" in main_error(
        capsys, *run, "--tasks", str(TASKS / "reverse.yaml"), "--num_fewshot", "-1"
    )
    # the built-in index: read once (some 10 s), shared by the two cases below
    line = main_error(capsys, *run, "--tasks", "arc_easyy")
    assert "unknown lm-eval task 'arc_easyy'" in line and "arc_easy" in line.split("did you mean")[1]
    line = main_error(capsys, *run, "--tasks", "arc_easy")  # its data: allenai/ai2_arc on the hub
    assert "allenai/ai2_arc" in line and "cannot be reached" in line


def test_without_lm_eval_tasks_say_how_to_install_it(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.delitem(sys.modules, "litpeft.harness")
    monkeypatch.delattr(litpeft, "harness")
    line = main_error(capsys, "evaluate", "--model", "tiny:llama", "--tasks", "arc_easy")
    assert "pip install 'litpeft[eval]'" in line
