"""Prompt tuning (Lester et al. 2021) on tiny Llama, Qwen2 and GPT-2 models, with HF peft as the oracle."""

from __future__ import annotations

import json
import warnings

import method_helpers as helpers
import peft
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from litpeft.errors import LitPeftError
from litpeft.methods import PromptTuning, adapters_disabled
from litpeft.models import load_model
from litpeft.module import PeftLM

ARCHS = ["llama", "qwen2", "gpt2"]
TEXTS = ["The capital of France is Paris.", "2 + 2 = 4", "Hello, world! How are you today?"]
N = 5


def wrapped(arch: str, tok, method: PromptTuning | None = None, perturb: bool = True):
    """A tiny model with prompt tuning; ``perturb`` moves the prompt away from its init (as training would)."""
    return helpers.seeded_model(
        arch, tok, method or PromptTuning(num_virtual_tokens=N), noise=1.0 if perturb else None
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss_and_changes_only_the_prompt(arch):
    module = PeftLM(model=f"tiny:{arch}", method=PromptTuning(num_virtual_tokens=N, init="vocab"))
    module.configure_model()
    model = module.model
    before = helpers.snapshot(model)
    trainable = helpers.trainable_names(model)
    assert trainable == {"prompt_encoder.embedding.weight"}
    start, end = helpers.eval_loss_before_and_after_training(
        module, helpers.lm_batch(module.tokenizer, TEXTS), lr=0.3
    )
    assert end < start - 0.05, (start, end)
    assert helpers.changed(model, before) == trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_keep_the_input_length_and_disabled_gives_the_base(arch, tok):
    model = wrapped(arch, tok)
    base = load_model(f"tiny:{arch}", tokenizer=tok)
    enc = helpers.batch_of(tok, TEXTS)
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
    helpers.assert_padded_rows_equal_rows_alone(wrapped(arch, tok), tok, TEXTS, side)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_and_without_cache_agree(arch, tok):
    model = wrapped(arch, tok).eval()
    enc = helpers.batch_of(tok, TEXTS, side="left")
    cached = helpers.greedy_with_cache_equals_without(model, enc, tok.pad_token_id, 10)
    # and a left-padded batch generates what each prompt generates alone
    helpers.assert_rows_generate_as_alone(model, tok, TEXTS, enc, cached, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, tok):
    name = "prompt_encoder.embedding.weight"
    grads = [
        g[name] for g in helpers.checkpointing_grads(lambda: wrapped(arch, tok), helpers.lm_batch(tok, TEXTS))
    ]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16(arch, tok):
    model = wrapped(arch, tok)
    enc = helpers.batch_of(tok, TEXTS)
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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_peft_round_trip_gives_the_same_logits(arch, side, tok, tmp_path):
    method = PromptTuning(num_virtual_tokens=N)
    model = wrapped(arch, tok, method)
    helpers.export_peft(method, model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    ref = helpers.peft_model_without_key_warnings(load_model(f"tiny:{arch}", tokenizer=tok), tmp_path)
    enc = helpers.batch_of(tok, TEXTS, side=side)
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
    from litpeft.adapter_dir import load_adapter, save_adapter

    method = PromptTuning(num_virtual_tokens=N, init="text", init_text="Answer:", tokenizer="tiny:llama")
    module = PeftLM(model="tiny:llama", method=method)
    module.configure_model()
    with torch.no_grad():
        module.model.prompt_encoder.embedding.weight.add_(1.0)  # as if trained
    save_adapter(tmp_path, module)
    model, _, loaded, _ = load_adapter(tmp_path)
    assert isinstance(loaded, PromptTuning) and loaded.config() == method.config()
    enc = helpers.batch_of(tok, TEXTS)
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
    enc = helpers.batch_of(tok, ["The capital of France is", "1, 2, 3,"], side="left")
    helpers.greedy_with_cache_equals_without(model, enc, tok.pad_token_id, 4)
    helpers.export_peft(method, model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(
            load_model("smollm2-135m-instruct", tokenizer=tok), str(tmp_path)
        )
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref(**enc).logits[:, 8:])


def test_the_hook_handoff_leaves_no_record_behind(tok):
    """The pre-hook's record for the forward hook belongs to one call: gone after it, even when it fails."""
    from litpeft.methods.layout import attached

    model = wrapped("llama", tok)
    prompt = attached(model, "prompt_encoder")
    enc = helpers.batch_of(tok, TEXTS)
    with torch.no_grad():
        length = model(**enc).logits.shape[1]
        assert length == enc["input_ids"].shape[1] and prompt._calls == {}

        def fail(*args: object) -> None:
            raise RuntimeError("layer failed")

        handle = model.model.layers[0].register_forward_hook(fail)  # the backbone's forward raises
        with pytest.raises(RuntimeError, match="layer failed"):
            model(**enc)
        handle.remove()
        assert prompt._calls == {}
        assert model(**enc).logits.shape[1] == length  # and the next call is right
