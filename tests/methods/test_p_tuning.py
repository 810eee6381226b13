"""P-tuning (Liu et al. 2021) on tiny Llama, Qwen2 and GPT-2 models, with HF peft as the oracle."""

from __future__ import annotations

import json
import warnings

import method_helpers as helpers
import peft
import pytest
import torch

from litpeft.errors import LitPeftError
from litpeft.methods import PTuning, adapters_disabled, method_from_config
from litpeft.models import load_model
from litpeft.module import PeftLM

ARCHS = ["llama", "qwen2", "gpt2"]
N = 6
MARKER = "<|im_start|>assistant\n"
CHATS = [
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?",
    "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\nBlue",
]
PROMPTS = [c[: c.index(MARKER) + len(MARKER)] for c in CHATS]


def split_method(**kw) -> PTuning:
    return PTuning(
        num_virtual_tokens=N,
        placement="split",
        num_before=2,
        split_marker=MARKER,
        tokenizer="tiny:llama",
        **kw,
    )


def wrapped(arch: str, tok, method: PTuning | None = None, perturb: bool = True):
    """A tiny model with P-tuning, deterministic; ``perturb`` moves the encoder off its init."""
    return helpers.seeded_model(
        arch, tok, method or PTuning(num_virtual_tokens=N), noise=0.3 if perturb else None
    )


@pytest.mark.parametrize(("arch", "encoder"), [("llama", "lstm"), ("qwen2", "mlp"), ("gpt2", "lstm")])
def test_training_reduces_loss_and_changes_only_the_encoder(arch, encoder):
    module = PeftLM(model=f"tiny:{arch}", method=PTuning(num_virtual_tokens=N, encoder=encoder))
    module.configure_model()
    model = module.model
    before = helpers.snapshot(model)
    trainable = helpers.trainable_names(model)
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    start, end = helpers.eval_loss_before_and_after_training(
        module, helpers.lm_batch(module.tokenizer, CHATS), lr=1e-2
    )
    assert end < start - 0.05, (start, end)
    assert helpers.changed(model, before) == trainable


def reference_split_logits(model, tok, text: str) -> torch.Tensor:
    """The paper's template ``[P_0:i] x [P_i:N] y`` built by hand and run through the base model."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    b = max(s for s in range(len(ids) - len(marker) + 1) if ids[s : s + len(marker)] == marker) + len(marker)
    virtual = model.prompt_encoder.virtual_tokens()
    emb = model.get_input_embeddings()(torch.tensor(ids))
    seq = torch.cat([virtual[:2], emb[:b], virtual[2:], emb[b:]])
    with adapters_disabled(model):
        logits = model(inputs_embeds=seq[None]).logits[0]
    real = list(range(2, 2 + b)) + list(range(N + b, N + len(ids)))
    return logits[real]


@pytest.mark.parametrize("arch", ARCHS)
def test_split_placement_follows_the_template(arch, tok):
    model = wrapped(arch, tok, split_method())
    with torch.no_grad():
        for text in CHATS:
            ours = model(**helpers.batch_of(tok, [text])).logits[0]
            torch.testing.assert_close(ours, reference_split_logits(model, tok, text), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["prefix", "split"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_alone(arch, placement, side, tok):
    """Right padding: as is. Left padding: with mask-derived position ids (what ``generate`` passes)."""
    model = wrapped(arch, tok, split_method() if placement == "split" else None)
    helpers.assert_padded_rows_equal_rows_alone(model, tok, CHATS, side)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["prefix", "split"])
def test_generate_with_and_without_cache_agree(arch, placement, tok):
    model = wrapped(arch, tok, split_method() if placement == "split" else None).eval()
    enc = helpers.batch_of(tok, PROMPTS, side="left")
    cached = helpers.greedy_with_cache_equals_without(model, enc, tok.pad_token_id, 8)
    helpers.assert_rows_generate_as_alone(model, tok, PROMPTS, enc, cached, 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, tok):
    grads = helpers.checkpointing_grads(lambda: wrapped(arch, tok), helpers.lm_batch(tok, CHATS))
    assert grads[0]["prompt_encoder.embedding.weight"].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["bf16-true", "bf16-mixed"])
def test_bf16(arch, mode, tok):
    model = wrapped(arch, tok)
    helpers.bf16_forward_and_backward(model, helpers.lm_batch(tok, CHATS), mode)
    grad = model.prompt_encoder.embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_trainable_parameters_equal_peft_and_the_formula(arch, encoder, tok):
    h, layers = 24, 2
    method = PTuning(num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=h, encoder_num_layers=layers)
    model = wrapped(arch, tok, method, perturb=False)
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = model.config.hidden_size
    if encoder == "lstm":
        # per layer and direction: W_ih (4h x in) + W_hh (4h x h) + two biases (4h); in = d, then 2h
        lstm = sum(2 * (4 * h * (d if i == 0 else 2 * h) + 4 * h * h + 2 * 4 * h) for i in range(layers))
        formula = N * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    else:
        formula = N * d + (d * h + h) + (h * h + h) + (h * d + d)
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        encoder_reparameterization_type=encoder.upper(),
        encoder_hidden_size=h,
        encoder_num_layers=layers,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that MLP ignores encoder_num_layers
        ref = peft.get_peft_model(load_model(f"tiny:{arch}", tokenizer=tok), config)
    assert ours == ref.get_nb_trainable_parameters()[0] == formula


def test_adapter_holds_the_encoder_output_only(tok):
    method = PTuning(num_virtual_tokens=N)
    model = wrapped("llama", tok, method)
    state = method.adapter_state_dict(model)
    assert list(state) == ["prompt_encoder.prompt_embeddings"]
    assert state["prompt_encoder.prompt_embeddings"].shape == (N, model.config.hidden_size)
    fresh_method = method_from_config(method.config())
    fresh = load_model("tiny:llama", tokenizer=tok)
    fresh_method.apply(fresh)
    fresh_method.load_adapter_state_dict(fresh, state)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert not hasattr(fresh.prompt_encoder, "mlp_head")  # the encoder is gone
    enc = helpers.batch_of(tok, CHATS)
    with torch.no_grad():
        # the LSTM takes another kernel under no_grad than with autograd (last-bit differences)
        torch.testing.assert_close(fresh(**enc).logits, model(**enc).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(LitPeftError, match="prompt_embeddings"):
        fresh_method.load_adapter_state_dict(fresh, {"x": torch.zeros(1)})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_peft_round_trip_gives_the_same_logits(arch, side, tok, tmp_path):
    method = PTuning(num_virtual_tokens=N)
    model = wrapped(arch, tok, method)
    helpers.export_peft(method, model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    ref = helpers.peft_model_without_key_warnings(load_model(f"tiny:{arch}", tokenizer=tok), tmp_path)
    enc = helpers.batch_of(tok, CHATS, side=side)
    with torch.no_grad():
        theirs = ref(**enc).logits[:, N:]
        # trained form (encoder run under no_grad: another LSTM kernel than the exported output's)
        torch.testing.assert_close(model(**enc).logits, theirs, atol=1e-5, rtol=1e-5)
        # inference form (what a litpeft adapter directory loads): the very same tensor -> exact
        method.load_adapter_state_dict(model, method.adapter_state_dict(model))
        assert torch.equal(model(**enc).logits, theirs)


def test_bad_configs(tok):
    with pytest.raises(LitPeftError, match="num_virtual_tokens"):
        PTuning(num_virtual_tokens=0)
    with pytest.raises(LitPeftError, match="split_marker"):
        PTuning(placement="split", num_before=1)
    with pytest.raises(LitPeftError, match="num_before"):
        PTuning(num_virtual_tokens=4, placement="split", num_before=4, split_marker=MARKER)
    with pytest.raises(LitPeftError, match="encoder: .* is not allowed; one of: lstm, mlp"):
        PTuning(encoder="gru")
    with pytest.raises(LitPeftError, match="num_virtual_tokens=600"):
        PTuning(num_virtual_tokens=600).apply(load_model("tiny:qwen2", tokenizer=tok))
    model = wrapped("llama", tok, split_method())
    with pytest.raises(LitPeftError, match="split_marker .* not found"):
        model(**helpers.batch_of(tok, ["no marker here"]))
    with pytest.raises(LitPeftError, match="no peft equivalent"):
        split_method().to_peft(model, {})
    with pytest.raises(LitPeftError, match="cannot be merged"):
        PTuning().merge(model)


def test_adapter_directory_round_trip(tmp_path, tok):
    from litpeft.adapter_dir import load_adapter, save_adapter

    module = PeftLM(model="tiny:gpt2", method=PTuning(num_virtual_tokens=N, encoder="mlp"))
    module.configure_model()
    save_adapter(tmp_path, module)
    model, _, loaded, _ = load_adapter(tmp_path)
    assert isinstance(loaded, PTuning)
    enc = helpers.batch_of(tok, CHATS)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, module.model.eval()(**enc).logits, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_smollm2_split_placement_with_the_chat_template():
    from litpeft.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", tokenizer=tok)
    method = PTuning(
        num_virtual_tokens=6, encoder="mlp", placement="split", num_before=3, split_marker=MARKER
    )
    method.apply(model)  # split_marker tokenized with the model's own tokenizer
    messages = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Say hi.")]
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    helpers.greedy_with_cache_equals_without(
        model, helpers.batch_of(tok, prompts, side="left"), tok.pad_token_id, 4
    )
