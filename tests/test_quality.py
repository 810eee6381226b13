"""scripts/quality.py: both sides read the shipped configs; the page marks what is missing; and the shipped
configs of the methods that add keys/values to attention do not wreck the base model before training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
_spec = importlib.util.spec_from_file_location("quality", REPO / "scripts" / "quality.py")
assert _spec is not None and _spec.loader is not None
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

from quality_report import NOTES, README_END, README_START, readme_table, write_readme_table, write_report  # noqa: E402  (scripts/ is on the path above)

PEFT_HAS = {
    "lora",
    "dora",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
    "p_tuning_v2",
    "llama_adapter",
    "ia3",
    "ln_tuning",
    "vera",
    "loha",
    "lokr",
    "adalora",
    "oft",
}


@pytest.mark.parametrize("method", list(quality.METHODS))
def test_each_method_reads_its_shipped_config_and_peft_gets_the_same_one(method: str) -> None:
    import peft

    from litpeft.methods import method_from_config

    cfg = quality.shipped(method)
    built = method_from_config(cfg["method"])
    assert built.config()["init_args"].items() >= cfg["method"]["init_args"].items()
    assert cfg["optimizer"]["init_args"]["lr"] > 0 and cfg["precision"] == "bf16-mixed"
    counterpart = quality.peft_counterpart(method, cfg["method"]["init_args"])
    assert (counterpart is not None) == (method in PEFT_HAS)
    if counterpart is not None:
        kind, kwargs = counterpart
        getattr(peft, kind)(task_type="CAUSAL_LM", **kwargs)  # a valid peft config
    if method == "dora":
        assert cfg["method"]["init_args"]["use_dora"] and counterpart and counterpart[1]["use_dora"]


def test_a_short_run_scales_adaloras_step_schedule_so_that_it_fits() -> None:
    """The shipped tinit 20 + tfinal 50 leave no budgeting phase in 60 steps: both sides failed there."""
    from litpeft.methods.adalora_budget import RankAllocator

    args = quality.shipped("adalora", 60)["method"]["init_args"]
    assert (args["tinit"], args["tfinal"], args["delta_t"]) == (8, 20, 4)
    schedule = [args[k] for k in ("target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2")]
    RankAllocator({}, *schedule).check_schedule(60)  # litpeft's own check: raises on the shipped 20 + 50
    assert quality.shipped("adalora", 150)["method"]["init_args"]["tinit"] == 20
    kind, kwargs = quality.peft_counterpart("adalora", args) or ("", {})
    assert (kwargs["tinit"], kwargs["tfinal"], kwargs["deltaT"]) == (8, 20, 4)


def _result(side: str, method: str | None, em: float = 0.5) -> dict[str, Any]:
    return {
        "side": side,
        "method": method,
        "steps": 150,
        "limit": None,
        "exact_match": em,
        "train_s": 1.0,
        "total_s": 2.0,
        "lr": 1e-3,
    }


def test_the_page_says_which_methods_are_missing_and_keeps_its_notes(tmp_path: Path) -> None:
    out = tmp_path / "quality.md"
    peft_lora = _result("peft", "lora", 0.8) | {"peft_config": {"class": "LoraConfig", "r": 16}}
    results = [_result("base", None, 0.1), _result("litpeft", "lora", 0.9), peft_lora]
    write_report(results, out, ["lora", "houlsby"], in_peft={"lora"})
    text = out.read_text()
    assert "**Partial:** not measured in this run: houlsby." in text
    assert "| lora | 0.001 | 0.90 | 0.80 | LoraConfig |" in text and "exact match 0.10" in text
    out.write_text(text + NOTES + "\nwhy P-tuning v2 needed a new default\n")
    write_report(results + [_result("litpeft", "houlsby", 0.7)], out, ["lora", "houlsby"], in_peft={"lora"})
    text = out.read_text()
    assert "Partial" not in text and "| houlsby | 0.001 | 0.70 | - | not in peft |" in text
    assert text.endswith(NOTES + "\nwhy P-tuning v2 needed a new default\n")
    assert out.with_suffix(".json").is_file()


def test_the_peft_column_names_the_config_each_peft_row_ran_with(tmp_path: Path) -> None:
    """From the row's recorded peft_config: a method peft has shows its class even when its peft row
    failed to record one ("-"), never "not in peft" (the column once said so for every newer method)."""
    out = tmp_path / "quality.md"
    dora = {"class": "LoraConfig", "use_dora": True}
    results = [
        _result("peft", "dora") | {"peft_config": dora},
        _result("peft", "p_tuning_v2") | {"peft_config": {"class": "PrefixTuningConfig"}},
        _result("peft", "oft") | {"peft_config": {"class": "OFTConfig"}},
        {"side": "peft", "method": "adalora", "steps": 150, "limit": None, "error": "exit 1"},
    ]
    write_report(results, out, ["dora", "p_tuning_v2", "oft", "adalora"])
    text = out.read_text()
    assert "| LoraConfig (use_dora) |" in text and "| PrefixTuningConfig (no projection) |" in text
    assert "| oft | 0.001 | - | 0.50 | OFTConfig |" in text and "| adalora | - | - | error | - |" in text
    assert "not in peft" not in text


def test_the_readme_table_is_the_published_one(tmp_path: Path) -> None:
    """README.md's quality table is generated from docs/quality.json, between its markers."""
    import json

    results = json.loads((REPO / "docs" / "quality.json").read_text())["results"]
    table = readme_table(results, list(quality.METHODS))
    readme = (REPO / "README.md").read_text()
    assert readme.split(README_START, 1)[1].split(README_END, 1)[0] == "\n" + table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(quality.METHODS)  # the header and every method
    lora = next(r for r in results if r["side"] == "litpeft" and r["method"] == "lora")
    assert f"| lora | {lora['exact_match']:.2f} |" in table
    copy = tmp_path / "README.md"
    copy.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    write_readme_table("new\n", copy)
    assert copy.read_text() == f"intro\n{README_START}\nnew\n{README_END}\noutro\n"


@pytest.mark.integration
@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2", "llama_adapter", "llama_adapter_v2"])
def test_shipped_attention_configs_keep_the_base_models_loss_at_step_0(method: str, smollm2: str) -> None:
    """Deep prompts at N(0, 1) against SmolLM2's values (RMS 0.05 in layer 0, 0.4-1.8 above) took the
    answer loss on demo rows from 0.52 to 10.3 before the first step; 150 steps could not undo it."""
    from bench.data import batches

    from litpeft.loss import answer_logits, token_loss
    from litpeft.methods import method_from_config
    from litpeft.models import load_model

    data = batches(smollm2, "demo", 1)

    def loss_of(model: Any) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits, targets = answer_logits(model, data[0])
            return float(token_loss(logits, targets)[0])

    torch.manual_seed(0)
    model = load_model(smollm2)
    base = loss_of(model)
    method_from_config(quality.shipped(method)["method"]).apply(model)
    assert loss_of(model) < 2 * base


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_the_peft_side_scores_prompt_learning_with_peft_s_own_forward(kind: str, smollm2: str) -> None:
    """peft 0.21's generate with the KV cache answered "219-\\n\\n\\n" on SmolLM2 where a greedy loop of
    the same PeftModel's forward answered "21-Sep-1959" (the table's peft EM was 0.00 for prompt tuning),
    and a left-padded batch shifts a prefix's distances (0.00 for prefix tuning). The peft side's answers
    (quality.prepare_peft_generation, then litpeft's generate) equal that loop's, prompt by prompt."""
    import peft
    from bench.data import datamodule
    from transformers import AutoModelForCausalLM

    from litpeft.evaluation import split_for_generation
    from litpeft.inference import generate
    from litpeft.models import resolve_spec

    path = str(resolve_spec(smollm2))
    dm = datamodule(smollm2, "demo")
    tok = dm.tokenizer
    messages, _ = split_for_generation(dm.val_samples[:3])
    prompts = [dm.style.generation_prompt(m, tok) for m in messages]
    lengths = {len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1  # a batch of them would be padded
    torch.manual_seed(0)
    text = {
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "Reply with the date only.",
        "tokenizer_name_or_path": path,
    }
    kwargs = {"num_virtual_tokens": 8, **(text if kind == "PromptTuningConfig" else {})}
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        getattr(peft, kind)(task_type="CAUSAL_LM", **kwargs),
    )
    if kind == "PrefixTuningConfig":  # peft's N(0, 1) prefix wrecks the model: keep it at the keys' scale
        with torch.no_grad():
            model.prompt_encoder.default.embedding.weight.mul_(0.05)
    answers = generate(model, tok, prompts, 8, quality.prepare_peft_generation(model), longest_first=False)
    model.eval()
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(8):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        loop = tok.decode(ids[0, -8:], skip_special_tokens=True)
        assert answer == loop[: len(answer)] and answer.strip()
