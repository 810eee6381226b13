"""Helpers shared by the PEFT method tests: tiny models with a method applied, batches, a few training
steps, the padding / KV-cache / checkpointing / bf16 checks, and the export to Hugging Face peft.

Two families of tests use them: those that tokenize with the ``tok`` fixture and no special tokens
(``batch_of``, ``lm_batch``; prompt tuning, P-tuning, bottleneck adapters) and those that tokenize with a
fresh tiny tokenizer and its special tokens (``padded``, ``labelled_batch``; prefix tuning, LLaMA-Adapter).
The methods that change the base layers' weights compare logits of ``adapter_helpers.token_ids`` (start
at the base, peft parity, export, merge).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import adapter_helpers
import peft
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BatchEncoding, PreTrainedTokenizerBase

from litpeft.adapter_dir import load_adapter
from litpeft.commands import export_adapter
from litpeft.data.collate import pad_batch
from litpeft.export import merge
from litpeft.methods import PeftMethod, adapters_disabled
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM

Batch = dict[str, torch.Tensor]

# --- tiny models ---------------------------------------------------------------------------------------


def base_model(arch: str) -> nn.Module:
    """The tiny ``arch`` model, with a fresh tiny tokenizer."""
    return load_model(f"tiny:{arch}", tokenizer=tiny_tokenizer())


def build(arch: str, method: PeftMethod, seed: int = 0) -> nn.Module:
    """The tiny ``arch`` model with ``method`` applied right after ``torch.manual_seed(seed)``."""
    model = base_model(arch)
    torch.manual_seed(seed)
    return method.apply(model)


def seeded_model(
    arch: str, tok: PreTrainedTokenizerBase, method: PeftMethod, noise: float | None = None
) -> nn.Module:
    """The tiny ``arch`` model with ``method`` applied under a private RNG seeded with 1 (deterministic,
    global RNG untouched); with ``noise``, every trainable tensor then gets ``noise * N(0, 1)`` added,
    which moves the method off its init as training would."""
    model = load_model(f"tiny:{arch}", tokenizer=tok)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        method.apply(model)
        if noise is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(noise * torch.randn_like(p))
    return model


def trainable_names(model: nn.Module) -> set[str]:
    """The names of the parameters that require a gradient."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _tensors(model: nn.Module, parameters_only: bool) -> dict[str, torch.Tensor]:
    if parameters_only:
        return {n: p.detach() for n, p in model.named_parameters()}
    return model.state_dict()


def snapshot(model: nn.Module, parameters_only: bool = False) -> dict[str, torch.Tensor]:
    """A copy of every state-dict tensor (parameters and buffers), or of the named parameters only."""
    return {k: v.clone() for k, v in _tensors(model, parameters_only).items()}


def changed(model: nn.Module, before: dict[str, torch.Tensor], parameters_only: bool = False) -> set[str]:
    """The names of the tensors that are no longer equal to their ``snapshot`` in ``before``."""
    return {k for k, v in _tensors(model, parameters_only).items() if not torch.equal(v, before[k])}


# --- batches -------------------------------------------------------------------------------------------


def batch_of(tok: PreTrainedTokenizerBase, texts: Sequence[str], side: str = "right") -> BatchEncoding:
    """``texts`` tokenized without special tokens, padded on ``side`` (which stays set on ``tok``)."""
    tok.padding_side = side
    return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)


def lm_batch(tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> Batch:
    """A causal-LM batch of ``texts`` as the collate function pads it: labels are the input ids."""
    samples = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        samples.append({"input_ids": ids, "labels": ids})
    return pad_batch(samples, tok.pad_token_id)


def padded(texts: Sequence[str], padding_side: str = "right") -> Batch:
    """``texts`` through a fresh tiny tokenizer (special tokens included), padded on ``padding_side``."""
    tok = tiny_tokenizer()
    tok.padding_side = padding_side
    return dict(tok(list(texts), return_tensors="pt", padding=True))


def labelled_batch(texts: Sequence[str], padding_side: str = "right") -> Batch:
    """``padded(texts, padding_side)`` with labels: the input ids, -100 on the padding."""
    enc = padded(texts, padding_side)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them: count of real tokens so far, minus one; pads get 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def logits(model: nn.Module, data: Batch) -> torch.Tensor:
    """The logits of ``data``'s input ids and attention mask, without gradient."""
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


# --- training ------------------------------------------------------------------------------------------


def train(model: nn.Module, data: Batch, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of the model's own loss on ``data`` (train mode, then back to eval mode);
    returns the loss of each step, taken before its update."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def train_module(module: PeftLM, batch: Batch, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps of ``module.loss_and_accuracy`` on ``batch``, over its trainable parameters;
    returns the loss of each step, taken before its update."""
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _, _ = module.loss_and_accuracy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def eval_loss(module: PeftLM, batch: Batch) -> float:
    """The loss on ``batch`` in eval mode, without dropout (GPT-2 has some), so that a comparison of two
    losses is not noise; the model goes back to train mode."""
    module.model.eval()
    with torch.no_grad():
        loss = module.loss_and_accuracy(batch)[0].item()
    module.model.train()
    return loss


def eval_loss_before_and_after_training(
    module: PeftLM, batch: Batch, lr: float, steps: int = 15
) -> tuple[float, float]:
    """The eval-mode loss on ``batch`` before and after ``steps`` training steps (dropout seeded with 0)."""
    start = eval_loss(module, batch)
    torch.manual_seed(0)
    train_module(module, batch, steps, lr)
    return start, eval_loss(module, batch)


# --- checks --------------------------------------------------------------------------------------------


def assert_padded_rows_equal_rows_alone(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], side: str
) -> None:
    """Each row of a batch padded on ``side`` gives, at its real tokens, its text's logits alone (1e-5).
    Right padding: as is. Left padding: with mask-derived position ids (what ``generate`` passes)."""
    enc = batch_of(tok, texts, side=side)
    kwargs = {"position_ids": mask_positions(enc["attention_mask"])} if side == "left" else {}
    with torch.no_grad():
        batched = model(**enc, **kwargs).logits
        for i, text in enumerate(texts):
            alone = model(**batch_of(tok, [text])).logits[0]
            real = enc["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i][real], alone, atol=1e-5, rtol=1e-5)


def assert_padding_side_does_not_change_real_token_logits(model: nn.Module, texts: Sequence[str]) -> None:
    """Each text alone (special tokens included) gives its row's logits in a left- and in a right-padded
    batch (1e-5), with position ids counted from the attention mask."""
    tok = tiny_tokenizer()
    for side in ("left", "right"):
        data = padded(texts, side)
        positions = (data["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            batched = model(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"], position_ids=positions
            ).logits
        for i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
            keep = data["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i][keep], alone, atol=1e-5, rtol=1e-5)


def greedy_with_cache_equals_without(
    model: nn.Module, enc: Batch | BatchEncoding, pad_token_id: int, max_new_tokens: int
) -> torch.Tensor:
    """Greedy ``generate`` with the KV cache, then without it: the same tokens. Returns them."""
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    cached = model.generate(**enc, use_cache=True, **common)
    uncached = model.generate(**enc, use_cache=False, **common)
    assert torch.equal(cached, uncached)
    return cached


def assert_rows_generate_as_alone(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    enc: BatchEncoding,
    generated: torch.Tensor,
    max_new_tokens: int,
) -> None:
    """Each row of ``generated`` (greedy, from the left-padded batch ``enc`` of ``texts``), without its
    padding, is what its text generates alone."""
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    for i, text in enumerate(texts):
        alone = model.generate(**batch_of(tok, [text]), **common)[0]
        pads = enc["input_ids"].shape[1] - int(enc["attention_mask"][i].sum())
        assert torch.equal(generated[i][pads:], alone)


def checkpointing_grads(make_model: Callable[[], nn.Module], batch: Batch) -> list[dict[str, torch.Tensor]]:
    """The gradients of the trainable parameters of two fresh models, without and with (non-reentrant)
    gradient checkpointing, after one backward pass of the loss on ``batch`` (dropout seeded with 0)."""
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)  # GPT-2 has dropout; checkpointing replays the same masks
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


def loss_and_grads(model: nn.Module, data: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One training-mode forward and backward pass on ``data`` without the KV cache: the loss and the
    gradient of each trainable parameter."""
    model.train()
    loss = model(**data, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def bf16_forward_and_backward(model: nn.Module, batch: Batch, mode: str) -> None:
    """Under ``mode`` (bf16 weights for ``bf16-true``, CPU autocast for ``bf16-mixed``) the logits stay
    within bf16 error of the fp32 ones; then the loss is backpropagated."""
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


def assert_bf16_autocast_and_bf16_weights(model: nn.Module, data: Batch) -> None:
    """Under CPU bf16 autocast the loss is finite (and backpropagates) and the real tokens' logits stay
    within 0.1 of the fp32 ones; with bf16 weights the logits are finite."""
    reference = logits(model, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = logits(model, data)
        loss = model(**data).loss
    loss.backward()
    assert torch.isfinite(loss)
    keep = data["attention_mask"].bool()
    assert (mixed.float()[keep] - reference[keep]).abs().max() < 0.1
    model.to(torch.bfloat16)
    assert torch.isfinite(logits(model, data)).all()


# --- Hugging Face peft ---------------------------------------------------------------------------------


def export_peft(method: PeftMethod, model: nn.Module, directory: Path) -> None:
    """Write ``method``'s adapter of ``model`` to ``directory`` as a peft adapter (config + safetensors)."""
    config, tensors = method.to_peft(model, method.adapter_state_dict(model))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))


def peft_model_without_key_warnings(base: nn.Module, directory: Path) -> peft.PeftModel:
    """peft's model of ``base`` with the adapter in ``directory``, in eval mode; loading it must raise no
    warning that mentions a key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return model.eval()


def peft_model_without_missing_keys(
    base: nn.Module, directory: Path, caplog: pytest.LogCaptureFixture
) -> peft.PeftModel:
    """peft's model of ``base`` with the adapter in ``directory``, in eval mode; no warning or logged
    message may speak of missing or unexpected keys."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base, directory).eval()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    return loaded


# --- methods that change the base layers (IA3, LN tuning, BitFit, VeRA, AdaLoRA, OFT, LoHa, LoKr) ------


def randomized(model: nn.Module, seed: int = 1, scale: float = 0.3) -> nn.Module:
    """``model`` in eval mode with every trainable tensor, in name order, set to ``scale * N(0, 1)`` from a
    generator seeded with ``seed`` (a zero-change adapter would pass any equality test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def assert_starts_as_base_and_disables_to_base(
    base: nn.Module, method: PeftMethod, randomize: Callable[[nn.Module], nn.Module] = randomized
) -> None:
    """``method`` on a copy of ``base`` gives ``base``'s logits exactly; ``randomize``d, other logits;
    with the adapters disabled, ``base``'s exactly again."""
    model = method.apply(copy.deepcopy(base)).eval()
    x = adapter_helpers.token_ids()
    assert torch.equal(adapter_helpers.logits(model, x), adapter_helpers.logits(base, x))
    randomize(model)
    assert not torch.allclose(adapter_helpers.logits(model, x), adapter_helpers.logits(base, x), atol=1e-3)
    with adapters_disabled(model):
        assert torch.equal(adapter_helpers.logits(model, x), adapter_helpers.logits(base, x))


def peft_twin(base: nn.Module, ours: nn.Module, config: peft.PeftConfig) -> peft.PeftModel:
    """peft's model of ``config`` on a copy of ``base`` with ``ours``' trainable tensors copied in."""
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                params[f"base_model.model.{name}.default"].copy_(p)
    return theirs


def assert_peft_loads_the_export(
    tmp_path: Path, spec: str, method: PeftMethod, atol: float = 1e-3, **adapter_kwargs: Any
) -> None:
    """An adapter of ``method`` on ``spec`` (``make_adapter``'s noise), exported by ``litpeft export``: peft
    loads it onto the base and gives litpeft's logits (1e-5), which differ from the base's (``atol``)."""
    adapter = adapter_helpers.make_adapter(tmp_path / "adapter", spec, method, **adapter_kwargs)
    export_adapter(str(adapter), str(tmp_path / "peft"))
    ours, _, _, _ = load_adapter(adapter)
    base = load_model(spec)
    x = adapter_helpers.token_ids()
    base_logits = adapter_helpers.logits(base, x)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    expected = adapter_helpers.logits(ours, x)
    assert not torch.allclose(expected, base_logits, atol=atol)
    torch.testing.assert_close(adapter_helpers.logits(theirs, x), expected, rtol=1e-5, atol=1e-5)


def merged_keeping_logits(model: nn.Module, method: PeftMethod) -> nn.Module:
    """``litpeft.export.merge`` of ``model`` (which checks the architecture's keys), asserting that the
    merged model gives ``model``'s logits (1e-5)."""
    x = adapter_helpers.token_ids()
    before = adapter_helpers.logits(model, x)
    merged = merge(model, method)
    torch.testing.assert_close(adapter_helpers.logits(merged, x), before, rtol=1e-5, atol=1e-5)
    return merged


def assert_same_trainables_as_peft(ours: nn.Module, theirs: peft.PeftModel) -> None:
    """``ours``' trainable tensors are ``theirs``' (peft names them ``base_model.model.<name>.default``)."""
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(mine) == len(peft_params)
    for name, p in mine.items():
        assert torch.equal(p, peft_params[f"base_model.model.{name}.default"]), name


def assert_training_logits_equal_peft(ours: nn.Module, theirs: peft.PeftModel) -> None:
    """In train mode, from the same seed, ``ours`` and ``theirs`` draw the same dropout masks: the same
    logits (1e-5); and the masks act (train and eval logits differ)."""
    ours.train(), theirs.train()
    x = adapter_helpers.token_ids()
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        a = adapter_helpers.logits(ours, x)
        torch.manual_seed(seed)
        torch.testing.assert_close(a, adapter_helpers.logits(theirs, x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(
        adapter_helpers.logits(ours, x), adapter_helpers.logits(ours.eval(), x), atol=1e-3
    )
