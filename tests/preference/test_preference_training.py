"""Preference training as SFT trains: resumed runs continue exactly (reference cache included), a quantized
(nf4) base trains a fp32 LoRA with the quantized base as the reference, gradient checkpointing changes
nothing."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from adapter_helpers import make_adapter, write_jsonl
from preference_helpers import PAIRS, batch, grads, policy
from safetensors.torch import load_file
from test_module import _Interrupt, _RecordLosses
from test_preference_module import _logps
from torch.testing import assert_close

import litpeft.preference.module as preference_module
from litpeft.methods import LoRA
from litpeft.models import load_model
from litpeft.preference import PreferenceDataModule, PreferenceLM
from litpeft.preference.data import collate_pairs
from litpeft.quantize import QuantizedLinear, quantize_model


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": f"{p} ({i})", "chosen": c, "rejected": r} for i in range(4) for p, c, r in PAIRS]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)  # 12 pairs: 6 batches of 2


def _fit(
    data: Path, root: Path, max_steps: int, ckpt_path: str | None = None, stop_at: int | None = None, **kwargs
) -> tuple[list[float], PreferenceLM]:
    L.seed_everything(0)
    record = _RecordLosses()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[
            record,
            L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
            *([_Interrupt(stop_at)] if stop_at else []),
        ],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    module = PreferenceLM(
        "tiny:llama", method=LoRA(r=4, alpha=8), adapter_dir=str(root / "adapter"), **kwargs
    )
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    dm = PreferenceDataModule(str(data), val_fraction=0.0, batch_size=2, prompt_style="plain")
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return record.losses, module


def _adapter(module: PreferenceLM) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}


def test_a_resumed_dpo_run_with_a_reference_cache_ends_as_an_uninterrupted_one(
    pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after 2 of 5 steps (mid-epoch) and resumed: the same losses and adapter as one run of 5, and
    as one run without the cache; the resumed run reads the cache from the checkpoint, scoring nothing."""
    plain, plain_module = _fit(pairs_file, tmp_path / "plain", 5)
    full, full_module = _fit(pairs_file, tmp_path / "full", 5, precompute_reference=True)
    first, _ = _fit(pairs_file, tmp_path / "part", 5, stop_at=2, precompute_reference=True)
    ckpt = torch.load(tmp_path / "part/ckpt/last.ckpt", weights_only=False)
    cached = ckpt["litpeft"]["preference"]["reference_cache"]["train"]["logps"]
    assert cached.shape == (12, 2) and bool(torch.isfinite(cached).all())
    scored = []
    monkeypatch.setattr(preference_module, "score_pairs", lambda *a: scored.append(a) or torch.zeros(12, 2))
    second, resumed = _fit(
        pairs_file,
        tmp_path / "part",
        5,
        ckpt_path=str(tmp_path / "part/ckpt/last.ckpt"),
        precompute_reference=True,
    )
    assert not scored
    assert_close(resumed.reference_cache.logps["train"], cached, rtol=0, atol=0)
    assert len(first) == 2 and len(second) == 3
    assert_close(torch.tensor(first + second), torch.tensor(full), rtol=1e-5, atol=1e-6)
    assert_close(torch.tensor(full), torch.tensor(plain), rtol=1e-4, atol=1e-5)  # the cache changes nothing
    assert resumed.trainer.global_step == 5
    for name, value in _adapter(full_module).items():
        assert float(value.abs().max()) > 0, name
        assert_close(_adapter(resumed)[name], value, msg=name)
        assert_close(_adapter(plain_module)[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_resumed_dpo_run_from_an_sft_adapter_keeps_it_as_the_reference(
    pairs_file: Path, tmp_path: Path
) -> None:
    sft = str(make_adapter(tmp_path / "sft", "tiny:llama", LoRA(r=4, alpha=8), style="plain"))
    full, full_module = _fit(pairs_file, tmp_path / "full", 4, init_adapter=sft)
    first, _ = _fit(pairs_file, tmp_path / "part", 4, stop_at=2, init_adapter=sft)
    ckpt = str(tmp_path / "part/ckpt/last.ckpt")
    second, resumed = _fit(pairs_file, tmp_path / "part", 4, ckpt_path=ckpt, init_adapter=sft)
    assert_close(torch.tensor(first + second), torch.tensor(full), rtol=1e-5, atol=1e-6)
    start = load_file(Path(sft) / "adapter.safetensors")
    for name, value in _adapter(full_module).items():
        assert_close(_adapter(resumed)[name], value, msg=name)
        assert_close(resumed.reference_tensors[name], start[name])  # the SFT adapter, not the checkpoint's


def test_dpo_on_an_nf4_base_trains_an_fp32_lora_against_the_quantized_base(
    pairs_file: Path, tmp_path: Path
) -> None:
    losses, module = _fit(pairs_file, tmp_path, 2, quantize="nf4", precompute_reference=True)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(isinstance(m, QuantizedLinear) for m in module.model.modules())
    adapter = _adapter(module)
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())
    assert all(float(v.abs().max()) > 0 for n, v in adapter.items() if "lora_B" in n)  # B starts at 0
    # the reference (cached and live) is the quantized base's own, loaded and quantized separately here
    base = quantize_model(load_model("tiny:llama", tokenizer=module.tokenizer), "nf4")
    data = module.trainer.datamodule.train_data
    b = collate_pairs([data[i] for i in range(len(data))], module.tokenizer.pad_token_id)
    expected = _logps(base, b)
    assert_close(module.reference_cache.logps["train"].T.reshape(-1), expected, rtol=1e-5, atol=1e-4)
    live = module.reference_logps(b)
    assert_close(torch.cat([live.chosen, live.rejected]), expected, rtol=1e-5, atol=1e-4)
    full_precision = _logps(load_model("tiny:llama", tokenizer=module.tokenizer), b)
    assert float((expected - full_precision).abs().max()) > 1e-3  # quantization shows


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(loss: str) -> None:
    result = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A init
        module = policy(loss, gradient_checkpointing=checkpointing)
        assert module.model.is_activation_checkpointing == checkpointing
        value = module.preference_loss(batch(module))[0]
        value.backward()
        result[checkpointing] = value.detach(), grads(module)
    (plain, plain_grads), (ckpt, ckpt_grads) = result[False], result[True]
    assert_close(ckpt, plain, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, g in plain_grads.items():
        assert float(g.abs().max()) > 0, name
        assert_close(ckpt_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
