"""Precision (32-true, bf16-mixed, bf16-true) and gradient checkpointing on one device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_helpers import fit_tiny_lora

from litpeft.methods import LoRA
from litpeft.module import PeftLM


def test_bf16_true_keeps_the_adapter_and_its_optimizer_state_in_fp32(tmp_path: Path) -> None:
    module = fit_tiny_lora(tmp_path, "bf16-true")
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # trained from B = 0
    state = module.trainer.optimizers[0].state
    assert all(state[p]["exp_avg"].dtype == torch.float32 for p in trainable.values())
    ids = torch.randint(0, 250, (1, 8))
    with torch.no_grad():
        assert module.model(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fp32_weights_train_under_32_true_and_bf16_mixed(tmp_path: Path, precision: str) -> None:
    module = fit_tiny_lora(tmp_path, precision)
    for n, p in module.named_parameters():
        # bf16-mixed holds the frozen linear weights in bf16 (what autocast computes them in anyway),
        # the tied head included (its own copy; the embedding table stays fp32)
        frozen_linear = not p.requires_grad and (".base_layer." in n or n.endswith("lm_head.weight"))
        assert p.dtype == (
            torch.bfloat16 if precision == "bf16-mixed" and frozen_linear else torch.float32
        ), n
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)
    ids = torch.randint(0, 250, (1, 8))
    with torch.no_grad():  # outside autocast the model still runs
        assert module.model(ids).logits.isfinite().all()


def _loss_and_grads(
    module: PeftLM, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = module.loss_and_accuracy(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "arch, method",
    [
        ("llama", "lora"),
        ("gpt2", "lora"),  # Conv1D
        ("qwen2", "prefix_tuning"),  # frozen linears without a wrapper, biases on q/k/v
        ("llama", "dora"),  # DoRA's base layers keep fp32
    ],
)
def test_bf16_mixed_frozen_linears_in_bf16_give_the_same_loss_and_gradients(arch: str, method: str) -> None:
    """Storing the frozen linear weights in bf16 is what autocast does on each use: bit-identical."""
    from lightning.pytorch import Trainer

    from litpeft.methods import method_from_config
    from litpeft.precision import store_frozen_linears

    init_args = {"r": 4, "use_dora": True} if method == "dora" else {}
    config = {"class_path": "lora" if method == "dora" else method, "init_args": init_args}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (2, 10), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    results = []
    for store in (False, True):
        torch.manual_seed(0)
        module = PeftLM(f"tiny:{arch}", method=method_from_config(config))
        if store:
            module.trainer = Trainer(precision="bf16-mixed", logger=False, enable_progress_bar=False)
        module.configure_model()
        with torch.no_grad():
            for p in module.trainable_parameters():
                p.normal_(std=0.05, generator=g.manual_seed(1))
        tensors = [
            *module.model.named_parameters(),
            *module.model.named_buffers(),
        ]  # a tied head's copy: a buffer
        stored = [(n, p) for n, p in tensors if p.dtype == torch.bfloat16]
        names = {n for n, _ in stored}
        if not store:
            assert not names
        elif method == "dora":  # DoRA's base layers keep fp32; the head (tied or not) is stored all the same
            assert names == {"lm_head.weight"}
        else:
            assert "lm_head.weight" in names and len(names) > 1
        assert all(n.endswith((".weight", ".bias")) and not p.requires_grad for n, p in stored)
        embedding, head = module.model.get_input_embeddings(), module.model.get_output_embeddings()
        assert embedding.weight.dtype == torch.float32
        if store and module.model.config.tie_word_embeddings:  # the head's own bf16 copy of the table
            assert head.weight.dtype == torch.bfloat16
            torch.testing.assert_close(head.weight, embedding.weight.bfloat16(), rtol=0, atol=0)
            # not a second parameter: a model summary counts the table once
            assert all(p is not head.weight for p in module.parameters())
        results.append(_loss_and_grads(module, batch))
        if store:
            assert store_frozen_linears(module.model, torch.bfloat16) == 0  # nothing left in fp32 to store
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=0, msg=n)


def test_bf16_true_on_a_quantized_base(tmp_path: Path) -> None:
    module = fit_tiny_lora(tmp_path, "bf16-true", quantize="nf4")
    absmax = [p for n, p in module.named_parameters() if n.endswith("absmax")]
    assert absmax and all(p.dtype == torch.float32 for p in absmax)  # bitsandbytes wants fp32 absmaxes
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)


def test_precision_cast_of_a_built_module_moves_but_never_downcasts_the_adapter() -> None:
    module = PeftLM("tiny:llama", method=LoRA(r=4))
    module.configure_model()
    module.to(torch.bfloat16)
    for n, p in module.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients() -> None:
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        module = PeftLM("tiny:llama", method=LoRA(r=4), gradient_checkpointing=checkpointing)
        module.configure_model()
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        calls = []
        module.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)
        ids = torch.randint(0, 250, (2, 16))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss, _, _ = module.loss_and_accuracy(batch)
        loss.backward()
        return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g)


class _GoodScaledWordEmbedding(torch.nn.Embedding):
    """Gemma's form: the lookup times ``embed_scale`` in the table's dtype."""

    def __init__(self) -> None:
        super().__init__(10, 4)
        self.embed_scale = torch.tensor(48**0.5)  # not a bf16 number

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class _OddScaledWordEmbedding(_GoodScaledWordEmbedding):
    """Named like one, computes more than ``lookup * embed_scale``."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) + 1


def test_store_frozen_embeddings_is_exact_or_keeps_the_table_fp32() -> None:
    from litpeft.precision import store_frozen_embeddings

    torch.manual_seed(0)
    plain, good, odd = torch.nn.Embedding(10, 4), _GoodScaledWordEmbedding(), _OddScaledWordEmbedding()
    model = torch.nn.ModuleList([plain, good, odd]).requires_grad_(False)
    reference = {
        id(m): m.weight.detach().bfloat16().float() for m in model
    }  # the fp32 table of a bf16 checkpoint
    for m in model:
        m.weight.data = m.weight.data.bfloat16()
    assert store_frozen_embeddings(model) == 2
    assert (plain.weight.dtype, good.weight.dtype, odd.weight.dtype) == (torch.bfloat16,) * 2 + (
        torch.float32,
    )
    assert store_frozen_embeddings(model) == 0  # already stored
    ids = torch.tensor([[1, 5, 9]])
    for m in model:
        expected = type(m).forward(_with_weight(m, reference[id(m)]), ids)
        assert m(ids).dtype == torch.float32
        torch.testing.assert_close(m(ids), expected, rtol=0, atol=0)
        torch.testing.assert_close(
            m(input_ids=ids) if m is not plain else m(input=ids), expected, rtol=0, atol=0
        )


def _with_weight(module: torch.nn.Embedding, weight: torch.Tensor) -> torch.nn.Embedding:
    import copy

    clone = copy.deepcopy(module)
    clone._forward_hooks.clear()
    clone.weight = torch.nn.Parameter(weight, requires_grad=False)
    return clone
