"""``litpeft merge``: a plain transformers model directory with the same logits as base + adapter.

Tolerance: the merged float32 model's logits are within 1e-4 (absolute and relative) of the unmerged
model's; the only difference is the order of floating-point operations (``(W + sBA) x`` vs
``W x + s B (A x)``). Adding a mergeable method to the check is one line in ``CASES``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from adapter_helpers import (
    NormTuning,
    logits,
    main_error,
    make_adapter,
    run_litpeft,
    save_other_base,
    token_ids,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from litpeft.adapter_dir import load_adapter
from litpeft.commands import merge
from litpeft.errors import LitPeftError
from litpeft.methods import LoRA, PeftLayer, PeftMethod
from litpeft.models import load_model, tiny_tokenizer

CASES: list = [
    pytest.param("tiny:llama", lambda: LoRA(r=4), id="lora"),
    pytest.param("tiny:llama", lambda: LoRA(r=4, alpha=8, use_rslora=True), id="rslora"),
    pytest.param("tiny:llama", lambda: LoRA(r=4, use_dora=True), id="dora"),
    pytest.param("tiny:qwen2", lambda: LoRA(r=4, bias="lora_only"), id="lora-bias-lora_only"),
    pytest.param("tiny:gpt2", lambda: LoRA(r=4, use_dora=True, bias="all"), id="dora-gpt2-conv1d-bias-all"),
]


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize(
    "make_method",
    [lambda: LoRA(r=4), lambda: LoRA(r=4, use_dora=True, bias="all")],
    ids=["lora", "dora-bias-all"],
)
def test_merge_into_a_quantized_gpt2_gives_conv1d_layers_back(
    tmp_path, quantize: str, make_method: Callable[[], PeftMethod]
) -> None:
    """GPT-2's Conv1D stores (in, out): a merged quantized layer must go back to a Conv1D, or
    ``from_pretrained`` refuses the shapes (and would silently transpose a square one)."""
    from transformers.pytorch_utils import Conv1D

    adapter = make_adapter(tmp_path / "adapter", "tiny:gpt2", make_method(), quantize=quantize)
    merge(str(adapter), str(tmp_path / "merged"))
    ours, _, _, _ = load_adapter(adapter)  # the quantized base + adapter, as trained
    merged = _load_plain(tmp_path / "merged")
    block = merged.transformer.h[0]
    assert all(isinstance(m, Conv1D) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc))
    ids = token_ids()
    torch.testing.assert_close(logits(merged, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)


def _load_plain(directory) -> AutoModelForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not any(isinstance(m, PeftLayer) for m in model.modules())
    return model.eval()


@pytest.mark.parametrize(("spec", "make_method"), CASES)
def test_merged_model_gives_the_same_logits(
    tmp_path, spec: str, make_method: Callable[[], PeftMethod]
) -> None:
    adapter = make_adapter(tmp_path / "adapter", spec, make_method())
    merge(str(adapter), str(tmp_path / "merged"))

    ours, _, _, _ = load_adapter(adapter)
    ids = token_ids()
    expected = logits(ours, ids)
    assert not torch.allclose(expected, logits(load_model(spec), ids), atol=1e-3)  # not a no-op adapter
    merged = _load_plain(tmp_path / "merged")
    assert merged.dtype == torch.float32
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


def test_merged_directory_has_tokenizer_and_chat_template(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=2))
    merge(str(adapter), str(tmp_path / "merged"))
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    tokenizer, reference = AutoTokenizer.from_pretrained(tmp_path / "merged"), tiny_tokenizer()
    assert tokenizer.chat_template == reference.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False
    )


def test_dtype_option_casts_the_float32_merge(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=4))
    merge(str(adapter), str(tmp_path / "fp32"))
    merge(str(adapter), str(tmp_path / "bf16"), dtype="bfloat16")
    fp32, bf16 = _load_plain(tmp_path / "fp32"), _load_plain(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16/config.json").read_text())["dtype"] == "bfloat16"
    for name, tensor in fp32.state_dict().items():
        assert torch.equal(bf16.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_default_dtype_is_the_base_checkpoints(tmp_path) -> None:
    base = save_other_base(tmp_path / "bf16-base", dtype=torch.bfloat16)
    adapter = make_adapter(tmp_path / "adapter", str(base), LoRA(r=2))
    merge(str(adapter), str(tmp_path / "merged"))
    assert _load_plain(tmp_path / "merged").dtype == torch.bfloat16


def test_merge_cli_in_a_subprocess(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:gpt2", LoRA(r=4))
    result = run_litpeft("merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-3000:]
    ours, _, _, _ = load_adapter(adapter)
    ids = token_ids()
    torch.testing.assert_close(
        logits(_load_plain(tmp_path / "merged"), ids), logits(ours, ids), rtol=1e-4, atol=1e-4
    )


def test_method_that_cannot_merge_says_so(tmp_path, capsys) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", NormTuning())
    with pytest.raises(LitPeftError, match="'test_norm_tuning' cannot be merged"):
        merge(str(adapter), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    assert "cannot be merged" in main_error(
        capsys, "merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.integration
def test_merge_real_model(tmp_path) -> None:
    spec = "smollm2-135m-instruct"
    adapter = make_adapter(
        tmp_path / "adapter", spec, LoRA(r=4, target_modules=["q_proj", "v_proj"]), scale=0.02
    )
    merge(str(adapter), str(tmp_path / "merged"))
    ours, tokenizer, _, _ = load_adapter(adapter)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    merged = _load_plain(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), logits(ours, ids), rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tokenizer.chat_template


def test_llama_adapter_v2_merges_bias_scale_and_keeps_the_prompts_as_an_adapter(tmp_path) -> None:
    """v2's bias/scale/norms fold into a plain model; its gated prompts become an adapter of that model."""
    from litpeft.methods import LlamaAdapterV2

    adapter = make_adapter(
        tmp_path / "adapter", "tiny:llama", LlamaAdapterV2(adapter_len=3, adapter_layers=2)
    )
    merge(str(adapter), str(tmp_path / "merged"))
    ids = token_ids()
    unmerged, _, _, _ = load_adapter(adapter)
    expected = logits(unmerged, ids)
    plain = _load_plain(tmp_path / "merged")
    assert not torch.allclose(logits(plain, ids), expected, atol=1e-3)  # the prompts matter
    again, _, method, _ = load_adapter(tmp_path / "merged" / "adapter")
    assert type(method).__name__ == "LlamaAdapter"
    torch.testing.assert_close(logits(again, ids), expected, rtol=1e-4, atol=1e-4)
