"""Checkpoints already quantized by transformers + bitsandbytes (``*-bnb-4bit`` repos): loaded as the
quantized base without dequantizing.

The checkpoints are made here the way such repos are made: ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`` on a tiny model, then ``save_pretrained``. The oracle is
transformers' own loading of the same directory (and the safetensors file itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from adapter_helpers import logits, token_ids, write_jsonl
from hub_server import HubServer, Repo, dir_files
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from litpeft.adapter_dir import load_adapter, read_adapter_config
from litpeft.commands import merge
from litpeft.data import InstructionDataModule
from litpeft.errors import LitPeftError
from litpeft.methods import HoulsbyAdapter, LoRA, PeftMethod
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM
from litpeft.quantize import QuantizedLinear

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama (bf16), and that model quantized by transformers + bitsandbytes and saved, per mode."""
    root = tmp_path_factory.mktemp("prequantized")
    tokenizer = tiny_tokenizer()
    load_model("tiny:llama", tokenizer=tokenizer).to(torch.bfloat16).save_pretrained(root / "dense")
    out = {}
    for mode, kwargs in CONFIGS.items():
        config = BitsAndBytesConfig(**kwargs, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(
            root / "dense", quantization_config=config, dtype=torch.bfloat16
        )
        model.save_pretrained(root / mode)
        tokenizer.save_pretrained(root / mode)
        out[mode] = root / mode
    return out


def transformers_model(path: Path) -> torch.nn.Module:
    """transformers' quantized model, in train mode: bitsandbytes' CPU ``Linear4bit`` repacks its weight
    on an eval-mode no-grad forward, and ``Linear8bitLt`` runs its dequantize-then-matmul CPU path."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).train()


def stored_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a bitsandbytes layer of transformers' model holds, under :class:`QuantizedLinear`'s names."""
    w = layer.weight
    if w.dtype == torch.int8:
        return {"qweight": w.data, "absmax": w.SCB}
    state = w.quant_state
    out = {"qweight": w.data, "absmax": state.absmax}
    if state.nested:
        out |= {"nested_absmax": state.state2.absmax, "nested_code": state.state2.code}
        out["nested_offset"] = state.offset.reshape(1)
    return out


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_weights_are_transformers_own_bit_for_bit(checkpoints: dict[str, Path], mode: str) -> None:
    ours = load_model(str(checkpoints[mode]), dtype=torch.bfloat16)
    theirs = transformers_model(checkpoints[mode])
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    bnb = {n: m for n, m in theirs.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    assert sorted(quantized) == sorted(bnb) and len(quantized) == 14  # 7 per layer; the tied head stays
    with safe_open(checkpoints[mode] / "model.safetensors", "pt") as f:
        for name, layer in quantized.items():
            assert layer.mode == mode
            for key, expected in stored_tensors(bnb[name]).items():
                assert torch.equal(getattr(layer, key), expected), (name, key)
            packed = f.get_tensor(f"{name}.weight")  # the file itself, too
            assert torch.equal(layer.qweight.flatten(), packed.flatten()), name
    plain = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if ".qweight" not in name and ".absmax" not in name and ".nested_" not in name:
            assert torch.equal(p, plain[name]), name
    assert not hasattr(ours.config, "quantization_config") and ours.hf_quantizer is None
    meta = load_model(str(checkpoints[mode]), dtype=torch.bfloat16, meta=True)  # FSDP's other ranks
    shapes = {n: (p.shape, p.dtype) for n, p in ours.named_parameters()}
    assert {n: (p.shape, p.dtype) for n, p in meta.named_parameters()} == shapes


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4"])
def test_logits_equal_transformers_quantized_model(checkpoints: dict[str, Path], mode: str) -> None:
    ids = token_ids()
    ours = load_model(str(checkpoints[mode]), dtype=torch.bfloat16)
    assert torch.equal(logits(ours, ids), logits(transformers_model(checkpoints[mode]), ids))


def test_int8_logits_match_transformers_within_bf16_rounding(checkpoints: dict[str, Path]) -> None:
    """bitsandbytes' CPU int8 path computes ``W = q * (SCB / 127)`` in fp32 and rounds ``W`` to bf16;
    litpeft's 16-bit int8 path rounds ``SCB / 127`` to bf16 first: a few bf16 rounding steps apart."""
    ids = token_ids()
    ours = logits(load_model(str(checkpoints["int8"]), dtype=torch.bfloat16), ids)
    theirs = logits(transformers_model(checkpoints["int8"]), ids)
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)
    nf4 = logits(load_model(str(checkpoints["nf4"]), dtype=torch.bfloat16), ids)
    assert not torch.allclose(ours, nf4, atol=1e-2, rtol=0)  # the tolerance tells quantizations apart


class Allocations(TorchDispatchMode):
    """Every op run inside the block: its name, and the shapes of the floating-point tensors it returns
    (not those on the meta device, where transformers builds the model before reading it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.outputs: list[torch.Size] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                self.outputs.append(t.shape)
        return out


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_loading_makes_no_dense_copy(checkpoints: dict[str, Path], mode: str) -> None:
    """No dequantization runs while the checkpoint loads, and no op returns a floating-point tensor of a
    quantized weight's size; the same spy sees both as soon as one layer is dequantized."""
    with Allocations() as seen:
        model = load_model(str(checkpoints[mode]), dtype=torch.bfloat16)
    weights = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantizedLinear)}
    sizes = {a * b for a, b in weights}

    def dense(outputs: list[torch.Size]) -> list[torch.Size]:
        return [s for s in outputs if s.numel() in sizes]

    assert not [op for op in seen.ops if "dequant" in op] and not dense(seen.outputs), seen.ops
    layer = model.model.layers[0].mlp.up_proj
    with Allocations() as control:
        layer.dequantize(torch.bfloat16)
    assert dense(control.outputs)
    assert mode == "int8" or [op for op in control.ops if "dequantize" in op]


def _fit(tmp_path: Path, spec: str, method: PeftMethod, precision: str) -> PeftLM:
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ["alpha", "gamma", "delta", "omega"] * 2]
    write_jsonl(tmp_path / "train.jsonl", rows)
    L.seed_everything(0)
    module = PeftLM(spec, method=method, adapter_dir=str(tmp_path / "adapter"))
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    data = InstructionDataModule(train_file=str(tmp_path / "train.jsonl"), val_fraction=0.25, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # an eval-mode no-grad forward first, as Lightning's default
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    return module


def test_lora_trains_on_the_stored_nf4_base_and_merges(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    spec = str(checkpoints["nf4"])
    before = load_model(spec, dtype=torch.bfloat16)
    module = _fit(tmp_path, spec, LoRA(r=4, target_modules="all-linear"), "bf16-mixed")
    assert module.quantize == "nf4"
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantizedLinear)
    assert layer.lora_B.weight.abs().sum() > 0  # moved away from its zero init: gradients flowed
    assert torch.equal(layer.base_layer.qweight, before.model.layers[0].self_attn.q_proj.qweight)
    assert read_adapter_config(tmp_path / "adapter")["quantize"] == "nf4"

    ours, _, _, _ = load_adapter(tmp_path / "adapter")  # the stored base again, not quantized twice
    assert isinstance(ours.model.layers[0].mlp.up_proj.base_layer, QuantizedLinear)
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"))  # as for litpeft's own nf4: dequantized
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = token_ids()
    torch.testing.assert_close(logits(merged, ids), logits(ours.float(), ids), atol=2e-2, rtol=2e-2)


def test_a_bottleneck_adapter_trains_on_the_stored_int8_base(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    module = _fit(
        tmp_path, str(checkpoints["int8"]), HoulsbyAdapter(bottleneck_size=8, init="zero_up"), "bf16-true"
    )
    assert module.quantize == "int8"
    ups = [p for n, p in module.model.named_parameters() if p.requires_grad and n.endswith("up.weight")]
    assert ups and all(p.abs().sum() > 0 for p in ups)  # moved away from its zero init


def test_model_quantize_must_be_null_or_the_stored_mode(checkpoints: dict[str, Path]) -> None:
    spec = str(checkpoints["nf4"])
    assert PeftLM(spec, quantize="nf4").quantize == PeftLM(spec).quantize == "nf4"
    with pytest.raises(LitPeftError) as e:
        PeftLM(spec, quantize="int8")
    assert str(e.value) == "the checkpoint is already nf4; drop --model.quantize or set it to nf4"


def test_a_bnb_4bit_repo_from_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoints: dict[str, Path]
) -> None:
    from test_hub import point_hub_at

    srv = HubServer(models={"org/tiny-bnb-4bit": Repo.from_files(dir_files(checkpoints["nf4-dq"]))}).start()
    try:
        point_hub_at(monkeypatch, srv.url, tmp_path / "hf")
        monkeypatch.setenv("LITPEFT_CACHE", str(tmp_path / "litpeft-cache"))
        model = load_model("org/tiny-bnb-4bit", dtype=torch.bfloat16)
    finally:
        srv.stop()
    assert {m.mode for m in model.modules() if isinstance(m, QuantizedLinear)} == {"nf4-dq"}
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(transformers_model(checkpoints["nf4-dq"]), ids))


def test_stored_configs_map_to_modes_and_the_rest_fails_with_one_line() -> None:
    from types import SimpleNamespace

    from litpeft.quantize import checkpoint_mode

    def mode(**qc: object) -> str | None:
        return checkpoint_mode(SimpleNamespace(quantization_config={"quant_method": "bitsandbytes", **qc}))

    assert mode(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) == "nf4-dq"
    assert mode(load_in_8bit=True) == "int8"
    assert checkpoint_mode(SimpleNamespace(quantization_config={"quant_method": "gptq", "bits": 4})) is None
    assert checkpoint_mode(SimpleNamespace()) is None
    for bad in (
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
        dict(load_in_8bit=True, llm_int8_has_fp16_weight=True),
    ):
        with pytest.raises(LitPeftError) as e:
            mode(**bad)
        assert "\n" not in str(e.value) and "the checkpoint is" in str(e.value)
