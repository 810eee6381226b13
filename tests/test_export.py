"""``litpeft export --format peft``: Hugging Face peft loads the directory and computes the same logits.

Adding an exportable method to the round trip is one line in ``CASES``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
from adapter_helpers import NormTuning, logits, main_error, make_adapter, run_litpeft, token_ids
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from litpeft.adapter_dir import load_adapter
from litpeft.commands import export_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import LlamaAdapter, LoRA, PeftMethod, PrefixTuning, PromptTuning, PTuning, PTuningV2
from litpeft.models import load_model

CASES: list = [
    pytest.param("tiny:llama", lambda: LoRA(r=4), id="lora"),
    pytest.param("tiny:llama", lambda: LoRA(r=4, alpha=8, use_rslora=True), id="rslora"),
    pytest.param("tiny:llama", lambda: LoRA(r=4, use_dora=True), id="dora"),
    pytest.param("tiny:qwen2", lambda: LoRA(r=4, bias="lora_only"), id="lora-bias-lora_only"),
    pytest.param("tiny:gpt2", lambda: LoRA(r=4), id="lora-gpt2-conv1d"),
    pytest.param("tiny:gpt2", lambda: LoRA(r=4, use_dora=True, bias="all"), id="dora-gpt2-bias-all"),
    pytest.param(
        "tiny:qwen2",
        lambda: LoRA(r=2, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"),
        id="lora-regex",
    ),
    pytest.param("tiny:llama", lambda: PromptTuning(num_virtual_tokens=4), id="prompt-tuning"),
    pytest.param("tiny:qwen2", lambda: PTuning(num_virtual_tokens=4, encoder="mlp"), id="p-tuning-mlp"),
    pytest.param("tiny:llama", lambda: PTuning(num_virtual_tokens=3, encoder="lstm"), id="p-tuning-lstm"),
    pytest.param("tiny:qwen2", lambda: PrefixTuning(num_virtual_tokens=4), id="prefix-tuning"),
    pytest.param("tiny:gpt2", lambda: PTuningV2(num_virtual_tokens=4), id="p-tuning-v2-gpt2"),
    pytest.param(
        "tiny:llama",
        lambda: LlamaAdapter(adapter_len=3, adapter_layers=2, gate_per_head=False),
        id="llama-adapter",
    ),
]


def _peft_load(base: torch.nn.Module, directory: str) -> tuple[PeftModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, directory)
    return model.eval(), [str(w.message) for w in caught]


@pytest.mark.parametrize(("spec", "make_method"), CASES)
def test_peft_round_trip(tmp_path, spec: str, make_method: Callable[[], PeftMethod]) -> None:
    adapter = make_adapter(tmp_path / "adapter", spec, make_method())
    export_adapter(str(adapter), str(tmp_path / "peft"))

    ours, _, _, _ = load_adapter(adapter)
    base = load_model(spec)
    ids = token_ids()
    with torch.no_grad():
        base_logits = logits(base, ids)
    peft_model, messages = _peft_load(base, str(tmp_path / "peft"))
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages

    # peft warns about adapter tensors missing from the file (checked above) but not about tensors in
    # the file that land nowhere: check those too.
    saved = load_file(str(tmp_path / "peft/adapter_model.safetensors"))
    unused = set_peft_model_state_dict(peft_model, saved).unexpected_keys
    # peft copies prompt-learning embeddings into its prompt encoder itself, then still lists the key as
    # unexpected in the module load it reports; the logits check below shows they are used.
    assert saved and [k for k in unused if k != "prompt_embeddings"] == []

    expected = logits(ours, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)

    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == spec
    assert config["task_type"] == "CAUSAL_LM"


def test_export_cli_in_a_subprocess(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    result = run_litpeft(
        "export", "--adapter", str(adapter), "--format", "peft", "--output", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    ours, _, _, _ = load_adapter(adapter)
    peft_model, _ = _peft_load(load_model("tiny:llama"), str(tmp_path / "out"))
    ids = token_ids()
    torch.testing.assert_close(logits(peft_model, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_method_without_peft_equivalent_is_refused_before_loading(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", NormTuning())
    with pytest.raises(LitPeftError, match="'test_norm_tuning' has no Hugging Face peft equivalent"):
        export_adapter(str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    error = main_error(capsys, "export", "--adapter", str(adapter), "--output", str(tmp_path / "out"))
    assert "--output" in error and "--overwrite" in error
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.integration
def test_peft_round_trip_real_model(tmp_path) -> None:
    spec = "smollm2-135m-instruct"
    adapter = make_adapter(
        tmp_path / "adapter", spec, LoRA(r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    )
    export_adapter(str(adapter), str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])  # the converted checkpoint
    peft_model, messages = _peft_load(base, str(tmp_path / "peft"))
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    ours, tokenizer, _, _ = load_adapter(adapter)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    # Logits reach about 30 here; 30 layers of DoRA's norm computed in another order leave ~3e-4.
    torch.testing.assert_close(logits(peft_model, ids), logits(ours, ids), rtol=1e-4, atol=1e-3)


def test_houlsby_export_is_refused_by_its_declaration_before_the_base_is_loaded(tmp_path) -> None:
    """The capability check runs first: a base that does not exist is never reached."""
    from litpeft.methods import HoulsbyAdapter

    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", HoulsbyAdapter(bottleneck_size=4))
    with pytest.raises(LitPeftError, match="Houlsby/Pfeiffer adapters have no Hugging Face peft equivalent"):
        export_adapter(str(adapter), str(tmp_path / "out"), model=str(tmp_path / "does-not-exist"))
    assert not (tmp_path / "out").exists()
