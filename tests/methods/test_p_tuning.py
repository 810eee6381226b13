"""P-tuning (Liu et al. 2021) on tiny Llama, Qwen2 and GPT-2 models, with HF peft as the oracle."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import save_file

from litpeft.data.collate import pad_batch
from litpeft.errors import LitPeftError
from litpeft.methods import PTuning, adapters_disabled, method_from_config
from litpeft.models import load_model, tiny_tokenizer
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


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


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
    model = load_model(f"tiny:{arch}", tokenizer=tok)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        (method or PTuning(num_virtual_tokens=N)).apply(model)
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.3 * torch.randn_like(p))
    return model


def batch_of(tok, texts, side="right"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them: count of real tokens so far, minus one; pads get 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def lm_batch(tok, texts=CHATS):
    samples = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        samples.append({"input_ids": ids, "labels": ids})
    return pad_batch(samples, tok.pad_token_id)


@pytest.mark.parametrize(("arch", "encoder"), [("llama", "lstm"), ("qwen2", "mlp"), ("gpt2", "lstm")])
def test_training_reduces_loss_and_changes_only_the_encoder(arch, encoder):
    module = PeftLM(model=f"tiny:{arch}", method=PTuning(num_virtual_tokens=N, encoder=encoder))
    module.configure_model()
    model = module.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    batch = lm_batch(module.tokenizer)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)

    def eval_loss() -> float:  # without dropout (GPT-2 has some), so the comparison is not noise
        model.eval()
        with torch.no_grad():
            loss = module.loss_and_accuracy(batch)[0].item()
        model.train()
        return loss

    start = eval_loss()
    torch.manual_seed(0)
    for _ in range(15):
        loss, _, _ = module.loss_and_accuracy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < start - 0.05, (start, end)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


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
            ours = model(**batch_of(tok, [text])).logits[0]
            torch.testing.assert_close(ours, reference_split_logits(model, tok, text), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["prefix", "split"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_alone(arch, placement, side, tok):
    """Right padding: as is. Left padding: with mask-derived position ids (what ``generate`` passes)."""
    model = wrapped(arch, tok, split_method() if placement == "split" else None)
    enc = batch_of(tok, CHATS, side=side)
    kwargs = {"position_ids": mask_positions(enc["attention_mask"])} if side == "left" else {}
    with torch.no_grad():
        logits = model(**enc, **kwargs).logits
        for i, text in enumerate(CHATS):
            alone = model(**batch_of(tok, [text])).logits[0]
            real = enc["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][real], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["prefix", "split"])
def test_generate_with_and_without_cache_agree(arch, placement, tok):
    model = wrapped(arch, tok, split_method() if placement == "split" else None).eval()
    enc = batch_of(tok, PROMPTS, side="left")
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = model.generate(**enc, use_cache=True, **common)
    uncached = model.generate(**enc, use_cache=False, **common)
    assert torch.equal(cached, uncached)
    for i, text in enumerate(PROMPTS):
        alone = model.generate(**batch_of(tok, [text]), **common)[0]
        pads = enc["input_ids"].shape[1] - int(enc["attention_mask"][i].sum())
        assert torch.equal(cached[i][pads:], alone)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, tok):
    batch = lm_batch(tok)
    grads = []
    for checkpointing in (False, True):
        model = wrapped(arch, tok).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)  # GPT-2 has dropout; checkpointing replays the same masks
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0]["prompt_encoder.embedding.weight"].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["bf16-true", "bf16-mixed"])
def test_bf16(arch, mode, tok):
    model = wrapped(arch, tok)
    batch = lm_batch(tok)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = model(**inputs).logits
    if mode == "bf16-true":
        model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
        out = model(**inputs, labels=batch["labels"])
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per op); the tiny model's logits are O(1)
    torch.testing.assert_close(out.logits.float(), ref, atol=0.15, rtol=0.05)
    out.loss.backward()
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
    enc = batch_of(tok, CHATS)
    with torch.no_grad():
        # the LSTM takes another kernel under no_grad than with autograd (last-bit differences)
        torch.testing.assert_close(fresh(**enc).logits, model(**enc).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(LitPeftError, match="prompt_embeddings"):
        fresh_method.load_adapter_state_dict(fresh, {"x": torch.zeros(1)})


def export_peft(method, model, directory) -> None:
    config, tensors = method.to_peft(model, method.adapter_state_dict(model))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_peft_round_trip_gives_the_same_logits(arch, side, tok, tmp_path):
    method = PTuning(num_virtual_tokens=N)
    model = wrapped(arch, tok, method)
    export_peft(method, model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = peft.PeftModel.from_pretrained(load_model(f"tiny:{arch}", tokenizer=tok), str(tmp_path)).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    enc = batch_of(tok, CHATS, side=side)
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
    with pytest.raises(LitPeftError, match="encoder must be"):
        PTuning(encoder="gru")
    with pytest.raises(LitPeftError, match="num_virtual_tokens=600"):
        PTuning(num_virtual_tokens=600).apply(load_model("tiny:qwen2", tokenizer=tok))
    model = wrapped("llama", tok, split_method())
    with pytest.raises(LitPeftError, match="split_marker .* not found"):
        model(**batch_of(tok, ["no marker here"]))
    with pytest.raises(LitPeftError, match="no peft equivalent"):
        split_method().to_peft(model, {})
    with pytest.raises(LitPeftError, match="cannot be merged"):
        PTuning().merge(model)


def test_adapter_directory_round_trip(tmp_path, tok):
    from litpeft.adapter import load_adapter, save_adapter

    module = PeftLM(model="tiny:gpt2", method=PTuning(num_virtual_tokens=N, encoder="mlp"))
    module.configure_model()
    save_adapter(tmp_path, module)
    model, _, loaded, _ = load_adapter(tmp_path)
    assert isinstance(loaded, PTuning)
    enc = batch_of(tok, CHATS)
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
    enc = batch_of(tok, prompts, side="left")
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**enc, **common)
    assert torch.equal(cached, model.generate(**enc, use_cache=False, **common))
