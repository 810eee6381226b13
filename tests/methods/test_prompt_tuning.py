"""Prompt tuning (Lester et al. 2021) on tiny Llama, Qwen2 and GPT-2 models, with HF peft as the oracle."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

from litpeft.data.collate import pad_batch
from litpeft.errors import LitPeftError
from litpeft.methods import PromptTuning, adapters_disabled
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM

ARCHS = ["llama", "qwen2", "gpt2"]
TEXTS = ["The capital of France is Paris.", "2 + 2 = 4", "Hello, world! How are you today?"]
N = 5


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def wrapped(arch: str, tok, method: PromptTuning | None = None, perturb: bool = True):
    """A tiny model with prompt tuning; ``perturb`` moves the prompt away from its init (as training would)."""
    model = load_model(f"tiny:{arch}", tokenizer=tok)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        (method or PromptTuning(num_virtual_tokens=N)).apply(model)
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p))
    return model


def batch_of(tok, texts=TEXTS, side="right"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them: count of real tokens so far, minus one; pads get 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def lm_batch(tok, texts=TEXTS):
    samples = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        samples.append({"input_ids": ids, "labels": ids})
    return pad_batch(samples, tok.pad_token_id)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss_and_changes_only_the_prompt(arch):
    module = PeftLM(model=f"tiny:{arch}", method=PromptTuning(num_virtual_tokens=N, init="vocab"))
    module.configure_model()
    model = module.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.embedding.weight"}
    batch = lm_batch(module.tokenizer)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=0.3)

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


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_keep_the_input_length_and_disabled_gives_the_base(arch, tok):
    model = wrapped(arch, tok)
    base = load_model(f"tiny:{arch}", tokenizer=tok)
    enc = batch_of(tok)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
        assert out.logits.shape[:2] == enc["input_ids"].shape
        assert all(h.shape[1] == enc["input_ids"].shape[1] for h in out.hidden_states)
        with adapters_disabled(model):
            assert torch.equal(model(**enc).logits, base(**enc).logits)
        assert not torch.allclose(out.logits, base(**enc).logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_alone(arch, side, tok):
    """Right padding: as is. Left padding: with mask-derived position ids (what ``generate`` passes)."""
    model = wrapped(arch, tok)
    enc = batch_of(tok, side=side)
    kwargs = {"position_ids": mask_positions(enc["attention_mask"])} if side == "left" else {}
    with torch.no_grad():
        logits = model(**enc, **kwargs).logits
        for i, text in enumerate(TEXTS):
            alone = model(**batch_of(tok, [text])).logits[0]
            real = enc["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][real], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_and_without_cache_agree(arch, tok):
    model = wrapped(arch, tok).eval()
    enc = batch_of(tok, side="left")
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = model.generate(**enc, use_cache=True, **common)
    uncached = model.generate(**enc, use_cache=False, **common)
    assert torch.equal(cached, uncached)
    # and a left-padded batch generates what each prompt generates alone
    for i, text in enumerate(TEXTS):
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
        grads.append(model.prompt_encoder.embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16(arch, tok):
    model = wrapped(arch, tok)
    enc = batch_of(tok)
    with torch.no_grad():
        ref = model(**enc).logits
    model.to(torch.bfloat16)
    assert model.prompt_encoder.embedding.weight.dtype == torch.bfloat16
    logits = model(**enc).logits
    # bf16 has 8 mantissa bits: relative error ~4e-3 per op; the tiny model's logits are O(1)
    torch.testing.assert_close(logits.float(), ref, atol=0.1, rtol=0.05)
    logits.float().logsumexp(-1).mean().backward()
    grad = model.prompt_encoder.embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters_equal_peft(arch, tok):
    model = wrapped(arch, tok, PromptTuning(num_virtual_tokens=7), perturb=False)
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ref = peft.get_peft_model(
        load_model(f"tiny:{arch}", tokenizer=tok),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7),
    )
    assert ours == ref.get_nb_trainable_parameters()[0] == 7 * model.config.hidden_size  # N x d


def export_peft(method, model, directory) -> None:
    config, tensors = method.to_peft(model, method.adapter_state_dict(model))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))


def load_peft(arch, tok, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(load_model(f"tiny:{arch}", tokenizer=tok), str(directory))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_peft_round_trip_gives_the_same_logits(arch, side, tok, tmp_path):
    method = PromptTuning(num_virtual_tokens=N)
    model = wrapped(arch, tok, method)
    export_peft(method, model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    ref = load_peft(arch, tok, tmp_path)
    enc = batch_of(tok, side=side)
    with torch.no_grad():
        ours = model(**enc).logits
        theirs = ref(**enc).logits[:, N:]  # peft returns the virtual positions too
    # Same embeddings, same positions (peft drops position ids: 0..N+L-1, as litpeft without them): exact.
    assert torch.equal(ours, theirs)


def test_inits(tok):
    model = wrapped(
        "llama", tok, PromptTuning(num_virtual_tokens=N, init="random", init_range=0.5), perturb=False
    )
    w = model.prompt_encoder.embedding.weight
    assert w.abs().max() <= 0.5 and w.std() > 0.1  # uniform(-0.5, 0.5) has std 0.29

    model = wrapped("llama", tok, PromptTuning(num_virtual_tokens=N, init="vocab"), perturb=False)
    table = model.get_input_embeddings().weight
    w = model.prompt_encoder.embedding.weight
    assert all((table == row).all(-1).any() for row in w)

    text = "Hi!"  # 3 byte tokens, repeated to 5: H i ! H i
    method = PromptTuning(num_virtual_tokens=N, init="text", init_text=text, tokenizer="tiny:llama")
    model = wrapped("llama", tok, method, perturb=False)
    ids = [ord("H"), ord("i"), ord("!")]
    expected = model.get_input_embeddings().weight[[tok.convert_tokens_to_ids(chr(i)) for i in ids * 2][:N]]
    assert torch.equal(model.prompt_encoder.embedding.weight, expected)


def test_bad_configs(tok):
    with pytest.raises(LitPeftError, match="num_virtual_tokens"):
        PromptTuning(num_virtual_tokens=0)
    with pytest.raises(LitPeftError, match="init_text"):
        PromptTuning(init="text")
    with pytest.raises(LitPeftError, match="num_virtual_tokens=512"):
        PromptTuning(num_virtual_tokens=512).apply(load_model("tiny:llama", tokenizer=tok))
    long_text = "x" * 600  # 600 byte tokens > the tiny model's 512 positions
    method = PromptTuning(num_virtual_tokens=N, init="text", init_text=long_text, tokenizer="tiny:llama")
    with pytest.raises(LitPeftError, match="init_text is 600 tokens"):
        method.apply(load_model("tiny:llama", tokenizer=tok))
    model = wrapped("gpt2", tok)
    with pytest.raises(LitPeftError, match="num_virtual_tokens=5 plus 510 input tokens"):
        model(input_ids=torch.zeros(1, 510, dtype=torch.long))
    t5 = T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32)
    )
    with pytest.raises(LitPeftError, match="encoder-decoder"):
        PromptTuning().apply(t5)
    with pytest.raises(LitPeftError, match="cannot be merged"):
        PromptTuning().merge(model)


def test_adapter_directory_round_trip(tmp_path, tok):
    from litpeft.adapter import load_adapter, save_adapter

    method = PromptTuning(num_virtual_tokens=N, init="text", init_text="Answer:", tokenizer="tiny:llama")
    module = PeftLM(model="tiny:llama", method=method)
    module.configure_model()
    with torch.no_grad():
        module.model.prompt_encoder.embedding.weight.add_(1.0)  # as if trained
    save_adapter(tmp_path, module)
    model, _, loaded, _ = load_adapter(tmp_path)
    assert isinstance(loaded, PromptTuning) and loaded.config() == method.config()
    enc = batch_of(tok)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, module.model.eval()(**enc).logits)


@pytest.mark.integration
def test_smollm2_text_init_generation_and_peft_parity(tmp_path):
    from litpeft.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", tokenizer=tok)
    # the tokenizer comes from the model's own directory (no `tokenizer` option needed)
    method = PromptTuning(num_virtual_tokens=8, init="text", init_text="Answer the question.")
    method.apply(model)
    ids = tok("Answer the question.", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 8)[:8]]
    assert torch.equal(model.prompt_encoder.embedding.weight, expected)
    enc = batch_of(tok, ["The capital of France is", "1, 2, 3,"], side="left")
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(**enc, **common), model.generate(**enc, use_cache=False, **common))
    export_peft(method, model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(
            load_model("smollm2-135m-instruct", tokenizer=tok), str(tmp_path)
        )
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref(**enc).logits[:, 8:])
