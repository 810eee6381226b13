"""Reading the base straight in its storage dtypes (litpeft.loading): the same model, no fp32 copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_helpers import fit_tiny_lora, save_other_base
from lightning.pytorch import Trainer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.adapter_dir import base_fingerprint, load_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import LoRA, PeftMethod, method_from_config
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM


def _tiny_gemma() -> PreTrainedModel:
    """A tiny Gemma: tied head, and an embedding that scales its lookup by sqrt(hidden size)."""
    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "gemma",
        vocab_size=len(tok),
        hidden_size=48,  # sqrt(48) is not a bf16 number: rounding the scale would show
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _save_tiny(tmp_path: Path, arch: str, dtype: torch.dtype) -> str:
    """``tiny:<arch>`` (or the tiny Gemma) written as a model directory stored in ``dtype``."""
    directory = tmp_path / f"{arch}-{str(dtype).split('.')[-1]}"
    model = (_tiny_gemma() if arch == "gemma" else load_model(f"tiny:{arch}")).to(dtype)
    with torch.no_grad():  # biases are zero at init: give them values that bf16 would round
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def _build(
    spec: str,
    method: PeftMethod,
    quantize: str | None,
    planned: bool,
    precision: str = "bf16-mixed",
    gradient_checkpointing: bool = False,
) -> PeftLM:
    """``planned=False``: the fp32 load followed by the casts, as before litpeft.loading (the embedding
    table fp32, a tied head its own bf16 copy)."""
    torch.manual_seed(0)
    module = PeftLM(spec, method=method, quantize=quantize, gradient_checkpointing=gradient_checkpointing)
    module.trainer = Trainer(precision=precision, logger=False, enable_progress_bar=False)
    if not planned:
        module.storage_dtypes = lambda: None
    module.configure_model()
    return module


def _loss_and_grads(module: PeftLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = module.loss_and_accuracy({"input_ids": ids, "labels": ids})
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "arch, checkpoint, method, quantize",
    [
        ("llama", torch.bfloat16, "lora", None),
        ("llama", torch.float32, "lora", None),
        ("gpt2", torch.bfloat16, "lora", None),  # Conv1D, tied head, biases
        ("gpt2", torch.float32, "lora", None),
        ("gpt2", torch.float32, "lora_bias", None),  # trained biases stay fp32
        ("llama", torch.float32, "dora", None),  # DoRA reads its base layers (q, v) in fp32, the rest not
        ("llama", torch.bfloat16, "lora", "nf4"),  # quantized from the bf16 weights
        ("gpt2", torch.bfloat16, "lora", "int8"),
    ],
)
def test_reading_in_storage_dtypes_builds_the_same_model(
    tmp_path: Path, arch: str, checkpoint: torch.dtype, method: str, quantize: str | None
) -> None:
    spec = _save_tiny(tmp_path, arch, checkpoint)
    kwargs = {
        "dora": {"use_dora": True, "target_modules": ["q_proj", "v_proj"]},
        "lora_bias": {"bias": "lora_only"},
    }.get(method, {})
    old, new = (_build(spec, LoRA(r=4, **kwargs), quantize, planned) for planned in (False, True))
    assert new.storage_dtypes(), "nothing was read in 16 bits"
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    assert any(t.dtype == torch.bfloat16 for t in b.values())
    tables = {f"model.{n}.weight" for n, m in new.model.named_modules() if isinstance(m, torch.nn.Embedding)}
    for name in a:
        if name in tables and checkpoint == torch.bfloat16:  # kept in the checkpoint's dtype now
            assert (a[name].dtype, b[name].dtype) == (torch.float32, torch.bfloat16), name
        else:
            assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name].to(a[name].dtype)), name
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(old), _loss_and_grads(new)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


class _Float32Allocations(TorchDispatchMode):
    """Records the shape of every fp32 tensor (not on the meta device) an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.is_meta:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_fp32_copy_of_a_frozen_linear_weight_under_bf16_mixed(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building from a bf16 checkpoint never makes an fp32 tensor of a linear weight's or an embedding
    table's shape (nor, so, a tied head's)."""
    spec = _save_tiny(tmp_path, arch, torch.bfloat16)
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # dispatch modes see this thread only
    module = PeftLM(spec, method=LoRA(r=4))
    module.trainer = Trainer(precision="bf16-mixed", logger=False, enable_progress_bar=False)
    with _Float32Allocations() as spy:
        module.configure_model()
    frozen = {
        tuple(m.weight.shape)
        for m in module.model.modules()
        if type(m) in (torch.nn.Linear, Conv1D, torch.nn.Embedding) and not m.weight.requires_grad
    }
    assert tuple(module.model.get_input_embeddings().weight.shape) in frozen
    assert frozen and not [shape for shape in spy.shapes if shape in frozen]


def _logits(module: PeftLM, ids: torch.Tensor, autocast: bool) -> torch.Tensor:
    module.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return module.model(ids).logits


@pytest.mark.parametrize(
    "arch", ["llama", "gemma", "gpt2", "qwen2"]
)  # tied, tied + scaled, tied + wpe, untied
def test_bf16_mixed_keeps_a_bf16_checkpoints_embedding_in_bf16_with_the_same_logits(
    tmp_path: Path, arch: str
) -> None:
    """The table holds the checkpoint's bf16 values either way: a bf16 table upcast at its output (and
    Gemma's scale applied in fp32) gives the fp32 table's activations; a tied head shares the one table."""
    spec = _save_tiny(tmp_path, arch, torch.bfloat16)
    old, new = (_build(spec, LoRA(r=4), None, planned) for planned in (False, True))
    embedding, head = new.model.get_input_embeddings(), new.model.get_output_embeddings()
    assert old.model.get_input_embeddings().weight.dtype == torch.float32
    assert embedding.weight.dtype == torch.bfloat16
    assert all(
        m.weight.dtype == torch.bfloat16 for m in new.model.modules() if isinstance(m, torch.nn.Embedding)
    )
    assert head.weight.dtype == torch.bfloat16
    if new.model.config.tie_word_embeddings:  # one storage, not a copy
        assert head.weight is embedding.weight
    else:
        assert head.weight.data_ptr() != embedding.weight.data_ptr()
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert embedding(ids).dtype == torch.float32  # the residual stream stays fp32
    for autocast in (True, False):
        torch.testing.assert_close(_logits(new, ids, autocast), _logits(old, ids, autocast), rtol=0, atol=0)
    generated = [m.model.generate(ids[:, :6], max_new_tokens=6, do_sample=False) for m in (old, new)]
    assert torch.equal(generated[0], generated[1])
    assert base_fingerprint(new.model) == base_fingerprint(old.model)  # adapters still find their base


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "houlsby", "llama_adapter", "p_tuning_v2"])
def test_methods_reading_the_table_keep_fp32_adapters_and_the_same_logits(
    tmp_path: Path, method: str
) -> None:
    """Prompt tuning from the vocabulary, P-tuning and Houlsby adapters create their tensors in the
    table's dtype: for them the table stays fp32 (the adapter must be fp32 under autocast); the others
    get the bf16 table. Either way the model computes what it did with the fp32 table."""
    spec = _save_tiny(tmp_path, "llama", torch.bfloat16)
    config = {"class_path": method, "init_args": {"init": "vocab"} if method == "prompt_tuning" else {}}
    old, new = (_build(spec, method_from_config(config), None, planned) for planned in (False, True))
    assert all(p.dtype == torch.float32 for p in new.model.parameters() if p.requires_grad)
    if method in ("llama_adapter", "p_tuning_v2"):
        assert new.model.get_input_embeddings().weight.dtype == torch.bfloat16
    for a, b in zip(old.trainable_parameters(), new.trainable_parameters(), strict=True):
        assert torch.equal(a, b)  # the same initial adapter (prompt tuning: the same vocabulary rows)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(new, ids, True), _logits(old, ids, True), rtol=0, atol=0)


def test_32_true_reads_a_bf16_checkpoint_all_in_fp32(tmp_path: Path) -> None:
    spec = _save_tiny(tmp_path, "llama", torch.bfloat16)
    module = _build(spec, LoRA(r=4), None, True, precision="32-true")
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


def test_bf16_embedding_under_gradient_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    spec = _save_tiny(tmp_path, "gemma", torch.bfloat16)
    old, new = (_build(spec, LoRA(r=4), None, p, gradient_checkpointing=True) for p in (False, True))
    assert new.model.get_input_embeddings().weight.dtype == torch.bfloat16
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(old), _loss_and_grads(new)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_meta_build_has_the_dtypes_of_the_real_one(tmp_path: Path, quantize: str | None) -> None:
    """FSDP: ranks other than 0 build on the meta device and receive rank 0's tensors; dtypes must match."""
    spec = _save_tiny(tmp_path, "llama", torch.bfloat16)
    module = _build(spec, LoRA(r=4), quantize, True)
    meta = module.build_model(meta=True)
    real = {n: p.dtype for n, p in module.model.state_dict().items()}
    assert {n: p.dtype for n, p in meta.state_dict().items()} == real
    assert real["model.embed_tokens.weight"] == torch.bfloat16


def test_an_adapter_trained_under_bf16_true_on_an_fp32_base_finds_its_base(tmp_path: Path) -> None:
    """bf16-true holds an fp32 checkpoint's table in bf16: the adapter's fingerprint is the rounded table's,
    and loading the base again in fp32 (generate, merge, export) must still recognise it."""
    fit_tiny_lora(tmp_path, precision="bf16-true")
    model, *_ = load_adapter(tmp_path / "adapter")
    assert model.get_input_embeddings().weight.dtype == torch.float32
    with pytest.raises(LitPeftError, match="--allow_other_base true uses it anyway"):
        load_adapter(tmp_path / "adapter", model=str(save_other_base(tmp_path / "other")))
