"""LLaMA-Adapter v1 and v2: zero-change start, the paper's parameter count, training, padding,
checkpointing, bf16, generation with the KV cache, peft round trip (v1), merge (v2), bad configs."""

from __future__ import annotations

import warnings
from unittest import mock

import method_helpers as helpers
import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods import METHODS, LlamaAdapter, LlamaAdapterV2, adapters_disabled
from litpeft.methods import attention as attention_module
from litpeft.methods import llama_adapter as llama_adapter_module
from litpeft.methods.llama_adapter import BiasScaleLinear
from litpeft.models import load_model, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gpt2"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there", "Adapters start at zero."]


def batch(padding_side: str = "right", texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    """``texts`` padded on ``padding_side``, labelled."""
    return helpers.labelled_batch(texts, padding_side)


def train(model: nn.Module, data: dict[str, torch.Tensor], steps: int = 5, lr: float = 2e-2) -> list[float]:
    """The shared ``train``, with this file's default step size."""
    return helpers.train(model, data, steps, lr)


def v1() -> LlamaAdapter:
    return LlamaAdapter(adapter_len=4, adapter_layers=2)


def v2() -> LlamaAdapterV2:
    return LlamaAdapterV2(adapter_len=4, adapter_layers=2)


def test_registered_under_own_names():
    assert METHODS["llama_adapter"] is LlamaAdapter and METHODS["llama_adapter_v2"] is LlamaAdapterV2
    assert LlamaAdapter().adapter_len == 10  # the paper's K


@pytest.mark.parametrize("arch", [*ARCHS, "mistral", "phi3"])
@pytest.mark.parametrize("make", [v1, v2])
def test_step_zero_logits_equal_the_base(arch, make):
    """Gate 0 (tanh 0 = 0), bias 0, scale 1, norms copied: the outputs are bit-identical (tolerance 0)."""
    data = batch("left")
    ours = helpers.logits(helpers.build(arch, make()), data)
    torch.testing.assert_close(ours, helpers.logits(helpers.base_model(arch), data), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("per_head", [True, False])
def test_v1_count_matches_the_paper(arch, per_head):
    """L layers x (K prompts x hidden + one gate per head, or one per layer)."""
    k, layers = 5, 1
    model = helpers.build(arch, LlamaAdapter(adapter_len=k, adapter_layers=layers, gate_per_head=per_head))
    c = model.config
    adapted = [m.layer_idx for m in model.modules() if hasattr(m, "litpeft_adaption")]
    assert adapted == [c.num_hidden_layers - 2, c.num_hidden_layers - 1][-layers:]  # the top L layers
    expected = layers * (k * c.hidden_size + (c.num_attention_heads if per_head else 1))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_v2_count_matches_the_paper(arch):
    """v1's prompts and gates + (bias, scale) per output feature of every linear layer but the LM head
    + every normalization layer's parameters."""
    k, layers = 3, 2
    model = helpers.build(arch, LlamaAdapterV2(adapter_len=k, adapter_layers=layers))
    base = helpers.base_model(arch)
    c = base.config
    prompts = layers * (k * c.hidden_size + c.num_attention_heads)
    head = base.get_output_embeddings()
    linear_out = sum(
        (m.weight.shape[1] if isinstance(m, Conv1D) else m.out_features)
        for m in base.modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m is not head
    )
    norms = sum(
        p.numel() for m in base.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == prompts + 2 * linear_out + norms


def test_v1_count_equals_peft_with_one_gate_per_layer():
    model = helpers.build("llama", LlamaAdapter(adapter_len=5, adapter_layers=2, gate_per_head=False))
    config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=2)
    pm = peft.get_peft_model(helpers.base_model("llama"), config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("make", [v1, v2])
def test_training_reduces_loss_and_changes_only_the_adapter(arch, make):
    model = helpers.build(arch, make())
    before = helpers.snapshot(model, parameters_only=True)
    trainable = helpers.trainable_names(model)
    # v1 starts with zero gates (zero gradient for the prompts): it needs a larger step than v2
    losses = train(model, batch(), steps=10, lr=1e-1 if make is v1 else 2e-2)
    assert losses[-1] < losses[0] - 0.03
    changed_names = helpers.changed(model, before, parameters_only=True)
    assert changed_names == trainable
    assert all("litpeft_adaption" in n or "adapter_" in n or ".tuned." in n for n in changed_names)
    # the base model is intact underneath
    data = batch("left")
    with adapters_disabled(model):
        torch.testing.assert_close(
            helpers.logits(model, data), helpers.logits(helpers.base_model(arch), data), atol=0, rtol=0
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_adaption_term_equals_eq8(arch):
    """The adaption term of one layer equals eq. 8 written out here (GPT-2 has no RoPE to replay, so the
    query is c_attn's; for RoPE models the query is captured from the layer's own attention call)."""
    model = helpers.build(arch, LlamaAdapter(adapter_len=3, adapter_layers=1)).eval()
    attn = [m for m in model.modules() if hasattr(m, "litpeft_adaption")][0]
    adaption = attn.litpeft_adaption
    with torch.no_grad():
        adaption.gate.copy_(torch.linspace(-1.0, 1.5, adaption.gate.numel()))
    captured = {}
    wrapped = attention_module._wrapped_implementation

    def spy(module):
        inner = wrapped(module)

        def call(mod, q, k, v, mask, **kw):
            if mod is attn:
                captured["q"], captured["scaling"] = q, kw["scaling"]
            return inner(mod, q, k, v, mask, **kw)

        return call

    out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
    outputs = []
    hook = out_proj.register_forward_hook(lambda m, args, out: outputs.append(args[0]))
    data = batch("right")
    with mock.patch.object(attention_module, "_wrapped_implementation", spy):
        helpers.logits(model, data)
        with adapters_disabled(model):
            helpers.logits(model, data)
    hook.remove()
    # eq. 8, written out: prompt keys/values through the layer's own projections, no RoPE
    x = adaption.prompt.detach()
    if arch == "gpt2":
        _, k, v = attn.c_attn(x).split(attn.split_size, dim=-1)
    else:
        k, v = attn.k_proj(x), attn.v_proj(x)
    heads, kv_heads = model.config.num_attention_heads, k.shape[-1] // attn.head_dim
    k = k.view(3, kv_heads, attn.head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(3, kv_heads, attn.head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    q = captured["q"]
    weights = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim**-0.5, dim=-1)
    term = torch.tanh(adaption.gate.detach()).view(1, -1, 1, 1) * weights @ v  # (B, H, T, d)
    expected = term.transpose(1, 2).flatten(2)
    torch.testing.assert_close(outputs[0] - outputs[1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_side_does_not_change_real_token_logits(arch):
    model = helpers.build(arch, v2())
    train(model, batch(), steps=2)
    helpers.assert_padding_side_does_not_change_real_token_logits(model, TEXTS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("make", [v1, v2])
def test_gradient_checkpointing_gives_the_same_gradients(arch, make):
    data = batch("left")
    results = []
    for checkpointing in (False, True):
        model = helpers.build(arch, make())
        with torch.no_grad():  # non-zero gates, so the prompts get gradients too
            for n, p in model.named_parameters():
                if n.endswith("litpeft_adaption.gate"):
                    p.fill_(0.5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results.append(helpers.loss_and_grads(model, data))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("make", [v1, v2])
def test_bf16(arch, make):
    data = batch("left")
    model = helpers.build(arch, make())
    train(model, batch(), steps=2)
    helpers.assert_bf16_autocast_and_bf16_weights(model, data)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_v2_bias_scale_under_autocast_is_the_fp32_formula_rounded(kind):
    """Under bf16 autocast the bias/scale runs in bf16 (y + (s-1) y + s b): within bf16 rounding of s (y + b)
    computed in fp32 from the same bf16 y, gradients of s and b included; and a scale of 1.003, below bf16's
    spacing at 1, still acts (s itself cast to bf16 would be exactly 1)."""
    torch.manual_seed(0)
    base = nn.Linear(32, 48) if kind == "linear" else Conv1D(48, 32)
    layer = BiasScaleLinear(base.requires_grad_(False))
    with torch.no_grad():
        layer.adapter_scale.uniform_(0.5, 1.5)
        layer.adapter_bias.normal_()
    x = torch.randn(4, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base(x).detach()
        out = layer(x)
    assert out.dtype == torch.bfloat16
    s, b = (p.detach().clone().requires_grad_(True) for p in (layer.adapter_scale, layer.adapter_bias))
    reference = s * (y.float() + b)
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=2**-7)
    grad = torch.randn_like(reference)
    out.float().backward(grad)
    reference.backward(grad)
    for ours, theirs in [(layer.adapter_scale.grad, s.grad), (layer.adapter_bias.grad, b.grad)]:
        # a sum over 64 tokens of bf16 products: an error relative to the largest entry, not to each one
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())
    with torch.no_grad():
        layer.adapter_scale.fill_(1.003)
        layer.adapter_bias.zero_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            relative = (layer(x).float() / y.float() - 1)[y.abs() > 1e-3].mean()
    assert relative > 1e-3


@pytest.mark.parametrize("arch", [*ARCHS, "mistral", "phi3"])
@pytest.mark.parametrize("make", [v1, v2])
def test_generate_with_cache_equals_without_and_prompt_kv_computed_once(arch, make):
    model = helpers.build(arch, make())
    train(model, batch(), steps=3)  # non-zero gates
    enc = helpers.padded(TEXTS[:2], "left")
    real = llama_adapter_module.prompt_key_value
    with mock.patch.object(llama_adapter_module, "prompt_key_value", side_effect=real) as calls:
        helpers.greedy_with_cache_equals_without(model, enc, tiny_tokenizer().pad_token_id, 8)
    # once per adapted layer for both generations (16 forward passes), not once per token
    assert calls.call_count == len([m for m in model.modules() if hasattr(m, "litpeft_adaption")])


def _peft_logits(directory, data, caplog) -> torch.Tensor:
    """The logits of ``data`` through peft's tiny Llama with the adapter exported to ``directory``."""
    return helpers.logits(
        helpers.peft_model_without_missing_keys(helpers.base_model("llama"), directory, caplog), data
    )


@pytest.mark.parametrize("per_head", [True, False])
def test_v1_peft_round_trip_at_step_zero(per_head, tmp_path, caplog):
    method = LlamaAdapter(adapter_len=4, adapter_layers=2, gate_per_head=per_head)
    model = helpers.build("llama", method)
    helpers.export_peft(method, model, tmp_path)
    data = batch("left")
    torch.testing.assert_close(
        _peft_logits(tmp_path, data, caplog), helpers.logits(model, data), atol=1e-5, rtol=1e-5
    )


def test_v1_peft_round_trip_after_training(tmp_path, caplog):
    """One gate per layer; peft's raw gate is our tanh(gate). Tolerance 1e-5 (float32 reassociation)."""
    method = LlamaAdapter(adapter_len=4, adapter_layers=2, gate_per_head=False)
    model = helpers.build("llama", method)
    train(model, batch(), steps=6)
    gates = [p for n, p in model.named_parameters() if n.endswith("gate")]
    assert all(g.abs().item() > 1e-3 for g in gates)
    helpers.export_peft(method, model, tmp_path)
    data = batch("left")
    ours = helpers.logits(model, data)
    keep = data["attention_mask"].bool()
    torch.testing.assert_close(_peft_logits(tmp_path, data, caplog)[keep], ours[keep], atol=1e-5, rtol=1e-5)
    assert (helpers.logits(helpers.base_model("llama"), data)[keep] - ours[keep]).abs().max() > 1e-3


def test_v1_export_refuses_what_peft_cannot_express(tmp_path):
    method = LlamaAdapter(adapter_len=4, adapter_layers=1)
    model = helpers.build("llama", method)
    train(model, batch(), steps=3)
    with pytest.raises(LitPeftError, match="gate_per_head"):
        method.to_peft(model, method.adapter_state_dict(model))
    gpt2_method = LlamaAdapter(adapter_len=4, adapter_layers=1)
    gpt2 = helpers.build("gpt2", gpt2_method)
    with pytest.raises(LitPeftError, match="llama and mistral"):
        gpt2_method.to_peft(gpt2, gpt2_method.adapter_state_dict(gpt2))
    with pytest.raises(LitPeftError, match="no Hugging Face peft equivalent"):
        v2().to_peft(model, {})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_v2_merge_gives_a_plain_hf_model_plus_v1_prompts(arch, tmp_path):
    method = LlamaAdapterV2(adapter_len=4, adapter_layers=2)
    model = helpers.build(arch, method)
    train(model, batch(), steps=6)
    data = batch("left")
    unmerged = helpers.logits(model, data)
    with adapters_disabled(model):
        base = helpers.logits(model, data)
    prompt_method, prompt_state = method.prompts(model)
    merged = method.merge(model)
    assert type(merged) is type(helpers.base_model(arch)) and not any(
        p.requires_grad for p in merged.parameters()
    )
    assert merged.config._attn_implementation == "sdpa"
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    plain = helpers.logits(reloaded, data)
    # bias/scale/norms alone differ from the base, and from the full adapter (the prompts are not in it)
    assert (plain - base).abs().max() > 1e-3
    # merged base + the prompts as a v1 adapter = the unmerged v2 model
    prompt_method.apply(reloaded)
    prompt_method.load_adapter_state_dict(reloaded, prompt_state)
    torch.testing.assert_close(helpers.logits(reloaded, data), unmerged, atol=1e-5, rtol=1e-4)


def test_v2_merge_refuses_layers_the_architecture_cannot_give_a_bias():
    method = LlamaAdapterV2(adapter_len=2, adapter_layers=1)
    model = helpers.build("qwen2", method)
    with pytest.raises(LitPeftError, match="o_proj|mlp"):
        method.merge(model)
    ok = LlamaAdapterV2(adapter_len=2, adapter_layers=1, target_modules=["q_proj", "k_proj", "v_proj"])
    merged = ok.merge(helpers.build("qwen2", ok))
    assert merged.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: LlamaAdapter(adapter_len=0), "adapter_len"),
        (lambda: LlamaAdapterV2(adapter_layers=0), "adapter_layers"),
    ],
)
def test_bad_config_names_the_option(make, option):
    with pytest.raises(LitPeftError, match=option):
        make()


def test_more_adapter_layers_than_the_model_has():
    model = helpers.base_model("llama")
    with pytest.raises(LitPeftError, match="adapter_layers=5.*2 layers"):
        LlamaAdapter(adapter_layers=5).apply(model)
    assert model.config._attn_implementation == "sdpa"  # refused before the model was touched


def test_architecture_without_attention_interface_is_refused():
    from transformers import AutoConfig

    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_head=4, n_layer=2)
    with pytest.raises(LitPeftError, match="llama_adapter.*attention interface"):
        LlamaAdapter(adapter_layers=1).apply(AutoModelForCausalLM.from_config(config))


@pytest.mark.integration
def test_v1_peft_parity_on_smollm2(tmp_path, caplog):
    """SmolLM2-135M (Llama, GQA 9/3 heads), top 10 layers, gates set to 0.5 (peft: tanh 0.5). Tolerance 1e-4."""
    from litpeft.models import load_tokenizer

    spec = "smollm2-135m-instruct"
    tok = load_tokenizer(spec)
    tok.padding_side = "left"
    data = dict(tok(["What is the capital of France?", "Hi"], return_tensors="pt", padding=True))
    method = LlamaAdapter(adapter_len=10, adapter_layers=10, gate_per_head=False)
    torch.manual_seed(0)
    model = method.apply(load_model(spec))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate"):
                p.fill_(0.5)
    ours = helpers.logits(model, data)
    helpers.export_peft(method, model, tmp_path)
    with warnings.catch_warnings(record=True):
        theirs = helpers.logits(peft.PeftModel.from_pretrained(load_model(spec), tmp_path).eval(), data)
    keep = data["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)
    assert (helpers.logits(load_model(spec), data)[keep] - ours[keep]).abs().max() > 1e-2
