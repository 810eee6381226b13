"""Houlsby / Pfeiffer bottleneck adapters (Houlsby et al. 2019) on tiny Llama, Qwen2 and GPT-2 models.

peft has no bottleneck adapters (peft issue #244): the references here are the base model itself (identity
at step 0) and the paper's parameter count.
"""

from __future__ import annotations

import method_helpers as helpers
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from litpeft.errors import LitPeftError
from litpeft.methods import HoulsbyAdapter, adapters_disabled
from litpeft.models import load_model
from litpeft.module import PeftLM

ARCHS = ["llama", "qwen2", "gpt2"]
TEXTS = ["The capital of France is Paris.", "2 + 2 = 4", "Hello, world! How are you today?"]


def wrapped(arch: str, tok, method: HoulsbyAdapter | None = None, perturb: bool = True):
    """A tiny model with adapters, deterministic; ``perturb`` moves the adapters off identity."""
    return helpers.seeded_model(
        arch, tok, method or HoulsbyAdapter(bottleneck_size=8), noise=0.1 if perturb else None
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_up_projection_starts_exactly_at_the_base(arch, tok):
    model = wrapped(arch, tok, HoulsbyAdapter(bottleneck_size=8, init="zero_up"), perturb=False)
    base = load_model(f"tiny:{arch}", tokenizer=tok)
    enc = helpers.batch_of(tok, TEXTS)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base(**enc).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_small_std_init_starts_near_the_base(arch, tok):
    """Paper init (truncated normal, std 1e-3, both projections): the adapter adds
    ``W_up f(W_down h)`` with entries of order ``1e-3 * sqrt(m) * 1e-3 * sqrt(d) * |h|``, about 1e-5 here;
    we allow 1e-4 on the logits (they are O(1))."""
    model = wrapped(arch, tok, HoulsbyAdapter(bottleneck_size=8, init="normal", init_std=1e-3), perturb=False)
    base = load_model(f"tiny:{arch}", tokenizer=tok)
    enc = helpers.batch_of(tok, TEXTS)
    with torch.no_grad():
        ours, ref = model(**enc).logits, base(**enc).logits
    assert not torch.equal(ours, ref)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_adapters_give_the_base(arch, tok):
    model = wrapped(arch, tok)
    base = load_model(f"tiny:{arch}", tokenizer=tok)
    enc = helpers.batch_of(tok, TEXTS)
    with torch.no_grad():
        assert not torch.allclose(model(**enc).logits, base(**enc).logits)
        with adapters_disabled(model):
            assert torch.equal(model(**enc).logits, base(**enc).logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("train_layer_norms", [True, False])
def test_trainable_parameters_match_the_paper(arch, placement, train_layer_norms, tok):
    m = 8
    method = HoulsbyAdapter(bottleneck_size=m, placement=placement, train_layer_norms=train_layer_norms)
    model = wrapped(arch, tok, method, perturb=False)
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    # one adapter: W_down (m x d) + b_down (m) + W_up (d x m) + b_up (d) = 2dm + d + m  (paper section 3.6)
    adapters = (2 if placement == "houlsby" else 1) * (2 * d * m + d + m)
    # two layer norms per layer: RMSNorm has a weight (d); GPT-2's LayerNorm a weight and a bias (2d)
    norms = 2 * (2 * d if arch == "gpt2" else d) if train_layer_norms else 0
    assert ours == layers * (adapters + norms)


def test_reduction_factor(tok):
    model = wrapped("llama", tok, HoulsbyAdapter(bottleneck_size=None, reduction_factor=16), perturb=False)
    assert model.model.layers[0].adapter_mlp.down.out_features == 64 // 16


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss_and_changes_only_adapters_and_norms(arch):
    module = PeftLM(model=f"tiny:{arch}", method=HoulsbyAdapter(bottleneck_size=8))
    module.configure_model()
    model = module.model
    before = helpers.snapshot(model)
    trainable = helpers.trainable_names(model)
    assert all(".adapter_" in n or "ln_" in n or "norm" in n for n in trainable)
    losses = helpers.train_module(module, helpers.lm_batch(module.tokenizer, TEXTS), steps=10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert helpers.changed(model, before) == trainable


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_alone(arch, side, tok):
    helpers.assert_padded_rows_equal_rows_alone(wrapped(arch, tok), tok, TEXTS, side)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_and_without_cache_agree(arch, tok):
    model = wrapped(arch, tok).eval()
    helpers.greedy_with_cache_equals_without(
        model, helpers.batch_of(tok, TEXTS, side="left"), tok.pad_token_id, 10
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, tok):
    grads = helpers.checkpointing_grads(lambda: wrapped(arch, tok), helpers.lm_batch(tok, TEXTS))
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["bf16-true", "bf16-mixed"])
def test_bf16(arch, mode, tok):
    model = wrapped(arch, tok)
    helpers.bf16_forward_and_backward(model, helpers.lm_batch(tok, TEXTS), mode)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_configs_and_unsupported_architectures(tok):
    with pytest.raises(LitPeftError, match="bottleneck_size and reduction_factor"):
        HoulsbyAdapter(bottleneck_size=8, reduction_factor=4)
    with pytest.raises(LitPeftError, match="bottleneck_size: 0 is not allowed"):
        HoulsbyAdapter(bottleneck_size=0)
    with pytest.raises(LitPeftError, match="activation"):
        HoulsbyAdapter(activation="softmax")
    with pytest.raises(LitPeftError, match="mlp_module='ffn_x' is not a child"):
        HoulsbyAdapter(mlp_module="ffn_x").apply(load_model("tiny:llama", tokenizer=tok))
    # BERT's layer has attention / intermediate / output, no MLP block to adapt as a unit
    bert = BertForMaskedLM(
        BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=32
        )
    )
    with pytest.raises(LitPeftError, match="MLP block .* set mlp_module"):
        HoulsbyAdapter().apply(bert)
    model = wrapped("llama", tok)
    with pytest.raises(LitPeftError, match="cannot be merged"):
        HoulsbyAdapter().merge(model)
    with pytest.raises(LitPeftError, match="peft issue #244"):
        HoulsbyAdapter().to_peft(model, {})


def test_adapter_directory_round_trip(tmp_path, tok):
    from litpeft.adapter_dir import load_adapter, save_adapter

    module = PeftLM(model="tiny:qwen2", method=HoulsbyAdapter(bottleneck_size=8, placement="pfeiffer"))
    module.configure_model()
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.1)  # as if trained
    save_adapter(tmp_path, module)
    model, _, loaded, _ = load_adapter(tmp_path)
    assert isinstance(loaded, HoulsbyAdapter) and loaded.placement == "pfeiffer"
    enc = helpers.batch_of(tok, TEXTS)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, module.model.eval()(**enc).logits)


@pytest.mark.integration
def test_smollm2_zero_up_is_the_base_and_generation_agrees():
    from litpeft.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    base = load_model("smollm2-135m-instruct", tokenizer=tok)
    model = load_model("smollm2-135m-instruct", tokenizer=tok)
    HoulsbyAdapter(bottleneck_size=32, init="zero_up").apply(model)
    enc = helpers.batch_of(tok, ["The capital of France is", "1, 2, 3,"], side="left")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base(**enc).logits)
    helpers.greedy_with_cache_equals_without(model, enc, tok.pad_token_id, 4)


def test_old_class_path_still_loads_with_a_warning(tmp_path, monkeypatch, tok):
    """``litpeft.methods.adapter`` (the module's name before it became ``bottleneck``) is an alias for a
    release: adapter directories and configs that name ``litpeft.methods.adapter.HoulsbyAdapter`` load."""
    import sys

    from litpeft.adapter_dir import load_adapter, save_adapter
    from litpeft.methods import method_from_config

    monkeypatch.delitem(sys.modules, "litpeft.methods.adapter", raising=False)
    with pytest.warns(FutureWarning, match="litpeft.methods.adapter moved to litpeft.methods.bottleneck"):
        method = method_from_config({"class_path": "litpeft.methods.adapter.HoulsbyAdapter"})
    assert type(method) is HoulsbyAdapter

    module = PeftLM(model="tiny:llama", method=HoulsbyAdapter(bottleneck_size=4))
    module.configure_model()
    save_adapter(tmp_path, module)
    config = tmp_path / "adapter.yaml"
    text = config.read_text()
    assert "litpeft.methods.bottleneck.HoulsbyAdapter" in text
    config.write_text(text.replace("methods.bottleneck.", "methods.adapter."))
    model, _, loaded, _ = load_adapter(tmp_path)
    assert type(loaded) is HoulsbyAdapter
    enc = helpers.batch_of(tok, TEXTS)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, module.model.eval()(**enc).logits)
