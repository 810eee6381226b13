"""Prefix tuning and P-tuning v2: peft parity (counts, exported logits), training, padding, checkpointing,
bf16, generation with the KV cache, the saved adapter, bad configs."""

from __future__ import annotations

import method_helpers as helpers
import peft
import pytest
import torch

from litpeft.errors import LitPeftError
from litpeft.methods import METHODS, PrefixTuning, PTuningV2, adapters_disabled
from litpeft.methods.prefix import ENCODER
from litpeft.models import load_model, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gpt2"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there", "A prefix is a learned context."]


def batch(padding_side: str = "right") -> dict[str, torch.Tensor]:
    """``TEXTS`` padded on ``padding_side``, labelled."""
    return helpers.labelled_batch(TEXTS, padding_side)


def methods() -> list[PrefixTuning]:
    return [PrefixTuning(num_virtual_tokens=6, encoder_hidden_size=24), PTuningV2(num_virtual_tokens=6)]


def test_registered_under_own_names():
    assert METHODS["prefix_tuning"] is PrefixTuning and METHODS["p_tuning_v2"] is PTuningV2
    assert PrefixTuning().prefix_projection and not PTuningV2().prefix_projection


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", [True, False])
def test_trainable_count_equals_peft_and_formula(arch, projection):
    n, hidden = 7, 24
    model = helpers.build(
        arch, PrefixTuning(num_virtual_tokens=n, prefix_projection=projection, encoder_hidden_size=hidden)
    )
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = helpers.base_model(arch)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=projection, encoder_hidden_size=hidden
    )
    theirs = sum(p.numel() for p in peft.get_peft_model(base, config).parameters() if p.requires_grad)
    assert ours == theirs
    # The formula (Li & Liang sec. 4.3): L layers, kv_dim = num_kv_heads * head_dim, E = kv_dim embedding.
    c = base.config
    layers = c.num_hidden_layers
    kv_dim = getattr(c, "num_key_value_heads", c.num_attention_heads) * (
        c.hidden_size // c.num_attention_heads
    )
    prefix = layers * 2 * kv_dim
    if projection:
        expected = n * kv_dim + (kv_dim * hidden + hidden) + (hidden * prefix + prefix)
    else:
        expected = n * prefix
    assert ours == expected


@pytest.mark.parametrize("arch", [*ARCHS, "gpt_neox"])  # GPT-NeoX: head_dim from hidden / heads
@pytest.mark.parametrize("make", [lambda: PrefixTuning(6, encoder_hidden_size=24), lambda: PTuningV2(6)])
def test_peft_round_trip_after_training(arch, make, tmp_path, caplog):
    """Export after training; peft loads the files without key warnings and gives the same logits (1e-5)."""
    method = make()
    model = helpers.build(arch, method)
    helpers.train(model, batch(), steps=3)
    data = batch("left")
    ours = helpers.logits(model, data)
    helpers.export_peft(method, model, tmp_path)
    theirs = helpers.logits(
        helpers.peft_model_without_missing_keys(helpers.base_model(arch), tmp_path, caplog), data
    )
    keep = data["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)
    # and the prefix matters: the base model's logits differ
    plain = helpers.logits(helpers.base_model(arch), data)
    assert (plain[keep] - ours[keep]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "mistral"])
def test_sliding_window_layers_let_the_prefix_leave_the_window_as_peft_does(arch, tmp_path, caplog):
    """On a sliding-window layer peft's prefix is a past KV-cache entry at positions 0..N-1, so tokens more
    than ``sliding_window`` past it no longer see it; litpeft's prefix follows the same rule: the export
    gives litpeft's logits on a sequence three windows long (Gemma 2/3: every other layer slides; Mistral
    with a window: every layer), and generation with the sliding cache equals it without."""
    window = 8
    method = PTuningV2(6)
    model = helpers.base_model(arch)
    model.config.sliding_window = model.config.sliding_window or window  # tiny Mistral has none
    assert model.config.sliding_window == window
    torch.manual_seed(0)
    method.apply(model).eval()
    ids = torch.randint(
        3, model.config.vocab_size, (2, 3 * window), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    helpers.export_peft(method, model, tmp_path)
    base = helpers.base_model(arch)
    base.config.sliding_window = window
    theirs = helpers.peft_model_without_missing_keys(base, tmp_path, caplog)
    with torch.no_grad():
        torch.testing.assert_close(
            ours, theirs(input_ids=ids).logits[:, -ids.shape[1] :], atol=1e-5, rtol=1e-5
        )
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    helpers.greedy_with_cache_equals_without(model, enc, tiny_tokenizer().pad_token_id, 4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("index", [0, 1])
def test_training_reduces_loss_and_changes_only_the_prefix(arch, index):
    method = methods()[index]
    model = helpers.build(arch, method)
    before = helpers.snapshot(model, parameters_only=True)
    trainable = helpers.trainable_names(model)
    assert trainable and all("litpeft_prefix" in n or n.startswith(ENCODER) for n in trainable)
    # P-tuning v2 trains raw prompts (std 1, as peft and the paper's code): a larger step size
    losses = helpers.train(model, batch(), steps=8, lr=1e-2 if method.prefix_projection else 1e-1)
    assert losses[-1] < losses[0] - 0.1
    assert helpers.changed(model, before, parameters_only=True) == trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_side_does_not_change_real_token_logits(arch):
    """Each sample alone equals its row in a left- or right-padded batch (positions from the mask)."""
    model = helpers.build(arch, PTuningV2(5)).eval()
    helpers.assert_padding_side_does_not_change_real_token_logits(model, TEXTS)


def test_real_tokens_start_at_position_n():
    """The rotary embedding sees positions N.. for the real tokens (the prefix holds 0..N-1); 0.. when disabled."""
    n = 4
    model = helpers.build("llama", PTuningV2(n)).eval()
    seen = []
    rotary = model.model.rotary_emb
    handle = rotary.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs.get("position_ids", args[-1]).clone()),
        with_kwargs=True,
    )
    data = batch("right")
    helpers.logits(model, data)
    length = data["input_ids"].shape[1]
    assert torch.equal(seen[-1][0], torch.arange(n, n + length))
    with adapters_disabled(model):
        helpers.logits(model, data)
    assert torch.equal(seen[-1][0], torch.arange(length))
    handle.remove()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_positions_past_the_context_are_refused(arch):
    """tiny:* models have 512 positions; 8 prefix positions leave room for 504 tokens, not 505."""
    model = helpers.build(arch, PTuningV2(num_virtual_tokens=8))
    ids = torch.randint(0, 250, (1, 505), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(input_ids=ids[:, :504]).logits.shape[1] == 504
        with pytest.raises(LitPeftError, match="num_virtual_tokens=8 plus 505 positions exceed .* 512"):
            model(input_ids=ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_prefix_is_the_base_model(arch):
    model = helpers.build(arch, PrefixTuning(5, encoder_hidden_size=16))
    data = batch("left")
    with adapters_disabled(model):
        ours = helpers.logits(model, data)
    base = helpers.logits(helpers.base_model(arch), data)
    torch.testing.assert_close(ours, base, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("index", [0, 1])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(arch, index):
    data = batch("left")
    grads = []
    for checkpointing in (False, True):
        model = helpers.build(arch, methods()[index])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        grads.append(helpers.loss_and_grads(model, data))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_and_bf16_weights(arch):
    data = batch("left")
    model = helpers.build(arch, PrefixTuning(5, encoder_hidden_size=16))
    helpers.assert_bf16_autocast_and_bf16_weights(model, data)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("index", [0, 1])
def test_generate_with_cache_equals_without(arch, index):
    model = helpers.build(arch, methods()[index]).eval()
    enc = helpers.padded(TEXTS[:2], "left")
    helpers.greedy_with_cache_equals_without(model, enc, tiny_tokenizer().pad_token_id, 10)
    # the prefix never enters the KV cache
    with torch.no_grad():
        cache = model(**enc, use_cache=True).past_key_values
    assert cache.get_seq_length() == enc["input_ids"].shape[1]


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_other_interface_architectures(arch):
    model = helpers.build(arch, PrefixTuning(4, encoder_hidden_size=16))
    assert (
        helpers.train(model, batch(), steps=6)[-1]
        < helpers.train(helpers.build(arch, PrefixTuning(4, encoder_hidden_size=16)), batch(), 1)[0]
    )
    helpers.greedy_with_cache_equals_without(
        model, helpers.padded(TEXTS[:2], "left"), tiny_tokenizer().pad_token_id, 6
    )


def test_adapter_holds_the_projected_prefix_only():
    method = PrefixTuning(5, encoder_hidden_size=16)
    model = helpers.build("llama", method)
    helpers.train(model, batch(), steps=2)
    state = method.adapter_state_dict(model)
    assert not any(ENCODER in k for k in state)
    assert sorted(state) == sorted(
        f"model.layers.{i}.self_attn.litpeft_prefix.{kv}" for i in range(2) for kv in ("key", "value")
    )
    assert state["model.layers.0.self_attn.litpeft_prefix.key"].shape == (2, 5, 16)  # (kv heads, N, head_dim)
    data = batch("left")
    expected = helpers.logits(model, data)
    fresh_method = PrefixTuning(5, encoder_hidden_size=16)
    fresh = helpers.build("llama", fresh_method, seed=1)
    fresh_method.load_adapter_state_dict(fresh, state)
    assert not hasattr(fresh, ENCODER)
    torch.testing.assert_close(helpers.logits(fresh, data), expected, atol=1e-6, rtol=1e-6)
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == 2 * 2 * 2 * 5 * 16


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: PrefixTuning(num_virtual_tokens=0), "num_virtual_tokens"),
        (lambda: PTuningV2(num_virtual_tokens=-3), "num_virtual_tokens"),
        (lambda: PrefixTuning(encoder_hidden_size=0), "encoder_hidden_size"),
        (lambda: PrefixTuning(prefix_dropout=1.5), "prefix_dropout"),
    ],
)
def test_bad_config_names_the_option(make, option):
    with pytest.raises(LitPeftError, match=option):
        make()


@pytest.mark.parametrize("model_type", ["bloom", "falcon"])
def test_architecture_without_attention_interface_is_refused(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        n_head=4,
        n_layer=2,
        num_attention_heads=4,
        num_hidden_layers=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LitPeftError, match="prefix_tuning.*attention interface"):
        PrefixTuning(4).apply(model)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PrefixTuning(5, encoder_hidden_size=16),
        lambda: PTuningV2(5),
        lambda: PTuningV2(5, init_text="Answer briefly.", tokenizer="tiny:llama"),
    ],
)
def test_adapter_directory_round_trip(make, tmp_path):
    """save_adapter writes the projected prefix; load_adapter rebuilds the model with the same logits."""
    from types import SimpleNamespace

    from litpeft.adapter_dir import load_adapter, read_adapter_weights, save_adapter

    method = make()
    model = helpers.build("llama", method)
    helpers.train(model, batch(), steps=2)
    save_adapter(tmp_path, SimpleNamespace(model=model, method=method, model_spec="tiny:llama"))
    assert sum(v.numel() for v in read_adapter_weights(tmp_path).values()) == 2 * 2 * 2 * 5 * 16
    loaded, _, loaded_method, _ = load_adapter(tmp_path)
    assert type(loaded_method) is type(method)
    data = batch("left")
    torch.testing.assert_close(
        helpers.logits(loaded, data), helpers.logits(model, data), atol=1e-6, rtol=1e-6
    )


@pytest.mark.integration
@pytest.mark.parametrize("make", [lambda: PrefixTuning(8, encoder_hidden_size=64), lambda: PTuningV2(8)])
def test_peft_parity_on_smollm2(make, tmp_path):
    """SmolLM2-135M (Llama, 9 heads over 3 KV heads): the exported prefix gives peft's logits (1e-4)."""
    from litpeft.models import load_tokenizer

    spec = "smollm2-135m-instruct"
    tok = load_tokenizer(spec)
    tok.padding_side = "left"
    data = dict(tok(["What is the capital of France?", "Hi"], return_tensors="pt", padding=True))
    method = make()
    torch.manual_seed(0)
    model = method.apply(load_model(spec))
    ours = helpers.logits(model, data)
    helpers.export_peft(method, model, tmp_path)
    theirs = helpers.logits(peft.PeftModel.from_pretrained(load_model(spec), tmp_path).eval(), data)
    keep = data["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)
