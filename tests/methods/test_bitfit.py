"""BitFit: only biases train. peft has no BitFit: the oracles are the base model's own bias tensors (their
count), the base model trained with only its biases unfrozen (the same step), and a merged model that
``from_pretrained`` reloads."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, token_ids
from transformers import AutoModelForCausalLM

from litpeft.errors import LitPeftError
from litpeft.export import check_exportable, merge
from litpeft.methods import BitFit, method_from_config
from litpeft.methods.bitfit import BiasDelta
from litpeft.models import load_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BiasDelta):
                m.bias_delta.add_(torch.randn(m.bias_delta.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gpt_neox"])
def test_trains_exactly_the_base_models_biases(arch: str) -> None:
    base = load_model(f"tiny:{arch}")
    model = BitFit().apply(copy.deepcopy(base))
    assert count(model) == sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias")) > 0
    assert all(n.endswith(".bias_delta") for n, p in model.named_parameters() if p.requires_grad)


def test_added_biases_on_a_family_without_any() -> None:
    """Llama: one new bias per linear layer but the LM head (q, k, v, o, gate, up, down: the hand count)."""
    base = load_model("tiny:llama")
    with pytest.raises(
        LitPeftError, match="no bias terms to train in LlamaForCausalLM .* add_missing_biases"
    ):
        BitFit().apply(copy.deepcopy(base))
    model = BitFit(add_missing_biases=True).apply(copy.deepcopy(base))
    c = base.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert count(model) == c.num_hidden_layers * (
        2 * c.hidden_size + 2 * kv + 2 * c.intermediate_size + c.hidden_size
    )


@pytest.mark.parametrize("arch, kwargs", [("gpt2", {}), ("llama", {"add_missing_biases": True})])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str, kwargs: dict) -> None:
    base = load_model(f"tiny:{arch}")
    helpers.assert_starts_as_base_and_disables_to_base(base, BitFit(**kwargs), randomize=randomized)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_two_adam_steps_equal_training_the_biases_themselves(arch: str) -> None:
    """The paper's BitFit, done by hand: the base model with only its biases unfrozen, two AdamW steps.
    The delta parameterization takes the same steps (the gradient of ``b + d`` in ``d`` is that in ``b``)."""
    base = load_model(f"tiny:{arch}").eval()
    ours = BitFit().apply(copy.deepcopy(base)).eval()
    plain = copy.deepcopy(base)
    plain.requires_grad_(False)
    for n, p in plain.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    x = token_ids()
    for model in (ours, plain):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    assert not torch.allclose(logits(ours, x), logits(base, x), atol=1e-3)
    torch.testing.assert_close(logits(ours, x), logits(plain, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch, kwargs", [("gpt2", {}), ("qwen2", {}), ("llama", {"add_missing_biases": True})]
)
def test_merged_equals_unmerged_and_reloads(tmp_path, arch: str, kwargs: dict) -> None:
    """The merged model is the architecture's own (Llama: its config's bias switches turned on), and
    ``from_pretrained`` reloads it with the same logits."""
    model = randomized(BitFit(**kwargs).apply(load_model(f"tiny:{arch}")))
    x = token_ids()
    before = logits(model, x)
    merged = helpers.merged_keeping_logits(model, BitFit(**kwargs))
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), before, rtol=1e-5, atol=1e-5)


def test_a_new_bias_the_architecture_cannot_hold_is_refused_at_merge() -> None:
    model = randomized(BitFit(add_missing_biases=True).apply(load_model("tiny:qwen2")))
    with pytest.raises(LitPeftError, match=r"^bitfit merge: Qwen2ForCausalLM has no bias in \["):
        merge(model, BitFit(add_missing_biases=True))


def test_targets_config_and_no_peft_export() -> None:
    method = BitFit(target_modules=["c_attn", "c_fc"])
    model = method.apply(load_model("tiny:gpt2"))
    trained = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"c_attn", "c_fc"}
    assert method_from_config(method.config()).config() == method.config()
    with pytest.raises(LitPeftError, match="'bitfit' has no Hugging Face peft equivalent"):
        check_exportable(method)
    with pytest.raises(
        LitPeftError, match="no bias terms to train in the selected layers of LlamaForCausalLM"
    ):
        BitFit(target_modules=["q_proj"]).apply(load_model("tiny:llama"))
