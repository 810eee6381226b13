"""LoRA: zero-change start, parity with Hugging Face peft, merge, targets, bias, rsLoRA/DoRA."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods import LoRA, LoRALinear, adapters_disabled
from litpeft.models import load_model, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gpt2", "mistral", "phi3"]


def _inputs(vocab: int = 250) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_step0_logits_equal_base(arch: str) -> None:
    base = load_model(f"tiny:{arch}")
    model = LoRA(r=4, alpha=8).apply(copy.deepcopy(base)).eval()
    x = _inputs()
    assert torch.equal(model(x).logits, base(x).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize(
    "kwargs, peft_kwargs",
    [
        ({"r": 4, "target_modules": "all-linear"}, {"r": 4, "target_modules": "all-linear"}),
        (
            {"r": 8, "target_modules": ["q_proj", "v_proj", "c_attn"]},
            {"r": 8, "target_modules": ["q_proj", "v_proj", "c_attn"]},
        ),
        ({"r": 2, "target_modules": r".*\.(k_proj|c_fc)"}, {"r": 2, "target_modules": r".*\.(k_proj|c_fc)"}),
        ({"r": 4, "bias": "lora_only"}, {"r": 4, "target_modules": "all-linear", "bias": "lora_only"}),
        ({"r": 4, "bias": "all"}, {"r": 4, "target_modules": "all-linear", "bias": "all"}),
        ({"r": 4, "use_dora": True}, {"r": 4, "target_modules": "all-linear", "use_dora": True}),
    ],
)
def test_trainable_count_equals_peft(arch: str, kwargs: dict, peft_kwargs: dict) -> None:
    base = load_model(f"tiny:{arch}")
    ours = LoRA(**kwargs).apply(copy.deepcopy(base))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**peft_kwargs))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora, use_dora", [(False, False), (True, False), (False, True)])
def test_forward_equals_peft_with_same_weights(arch: str, use_rslora: bool, use_dora: bool) -> None:
    """Copy our (non-zero) adapter into peft's model by name: both must compute the same logits."""
    base = load_model(f"tiny:{arch}")
    ours = LoRA(r=4, alpha=12, use_rslora=use_rslora, use_dora=use_dora).apply(copy.deepcopy(base)).eval()
    _randomize_lora(ours)
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=use_rslora, use_dora=use_dora),
    ).eval()
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = "base_model.model." + name.replace("lora_A.weight", "lora_A.default.weight").replace(
                    "lora_B.weight", "lora_B.default.weight"
                ).replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
                theirs_params[key].copy_(p)
    x = _inputs()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_logits_equal_unmerged(arch: str, use_dora: bool) -> None:
    model = LoRA(r=4, alpha=8, use_dora=use_dora, bias="lora_only").apply(load_model(f"tiny:{arch}")).eval()
    _randomize_lora(model)
    x = _inputs()
    before = model(x).logits
    merged = LoRA(r=4).merge(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    # fp32 reassociation of (W + sBA) x vs W x + s B (A x): tolerance 1e-5 absolute.
    torch.testing.assert_close(merged(x).logits, before, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_is_handled_with_transposed_weight() -> None:
    model = LoRA(r=4, target_modules=["c_attn"]).apply(load_model("tiny:gpt2"))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Conv1D)
    # Conv1D(nx=64, nf=192) maps 64 -> 192: A is (r, 64), B is (192, r).
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (192, 4)


def test_only_lora_tensors_train() -> None:
    model = LoRA(r=4).apply(load_model("tiny:llama"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not model.lm_head.weight.requires_grad


def test_adapters_disabled_gives_base_output() -> None:
    base = load_model("tiny:llama")
    model = LoRA(r=4).apply(copy.deepcopy(base)).eval()
    _randomize_lora(model)
    x = _inputs()
    assert not torch.equal(model(x).logits, base(x).logits)
    with adapters_disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)


def test_rslora_and_gaussian_init() -> None:
    layer = (
        LoRA(r=16, alpha=8, use_rslora=True, init="gaussian")
        .apply(load_model("tiny:llama"))
        .model.layers[0]
        .self_attn.q_proj
    )
    assert layer.scaling == pytest.approx(8 / 4)  # alpha / sqrt(r)
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.2)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_bad_config_errors_name_the_option() -> None:
    with pytest.raises(
        LitPeftError, match=r"target_modules: \[.nope.\] is not allowed; names that matched no layer"
    ):
        LoRA(target_modules=["nope"]).apply(load_model("tiny:llama"))
    with pytest.raises(ValueError, match="r: 0 is not allowed; LoRA.s rank must be a positive integer"):
        LoRA(r=0)


def test_config_round_trip() -> None:
    from litpeft.methods import method_from_config

    method = LoRA(r=3, alpha=5.0, target_modules=["q_proj"], use_dora=True)
    again = method_from_config(method.config())
    assert again.config() == method.config()
    assert method_from_config({"class_path": "lora", "init_args": {"r": 2}}).r == 2
    with pytest.raises(LitPeftError, match="unknown method"):
        method_from_config({"class_path": "litpeft.nope.Nope"})
    with pytest.raises(LitPeftError, match="not a litpeft PeftMethod"):
        method_from_config({"class_path": "torch.nn.Linear"})


def test_default_method_of_peftlm_describes_itself_as_lora() -> None:
    """PeftLM's default method is jsonargparse's lazy_instance(LoRA): its config must name LoRA itself."""
    from litpeft import PeftLM

    config = PeftLM(model="tiny:llama").method.config()
    assert config["class_path"] == "litpeft.methods.lora.LoRA"
    assert config["init_args"]["r"] == 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_autocast_forward_and_grads_equal_peft(arch: str) -> None:
    """Under CPU bf16 autocast (the bf16-mixed path, where LoRALinear casts its input once and scales
    the rank-r activations), logits and LoRA gradients match peft's with the same weights. The scaling
    alpha/r = 2 is a power of two, so both orders of the product round alike."""
    base = load_model(f"tiny:{arch}")
    ours = LoRA(r=4, alpha=8).apply(copy.deepcopy(base))
    _randomize_lora(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = name.replace(".weight", ".default.weight")
                theirs_params["base_model.model." + key].copy_(p)
    x = _inputs()
    outs = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        logits.float().pow(2).mean().backward()
        outs.append(logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            ref = theirs_params["base_model.model." + name.replace(".weight", ".default.weight")].grad
            torch.testing.assert_close(p.grad, ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_masks_replay_under_gradient_checkpointing(arch: str) -> None:
    """LoRA's CPU dropout draws from torch's generator, which checkpointing restores before recomputing:
    the same masks, so the same gradients as without checkpointing (and not those of no dropout)."""

    def make(dropout: float) -> torch.nn.Module:
        model = helpers.build(arch, LoRA(r=4, dropout=dropout))
        _randomize_lora(model)
        return model

    batch = helpers.lm_batch(tiny_tokenizer(), ["a b c d e f", "g h i"])
    plain, checkpointed = helpers.checkpointing_grads(lambda: make(0.3), batch)
    no_dropout, _ = helpers.checkpointing_grads(lambda: make(0.0), batch)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(plain[n], no_dropout[n]) for n in plain if "lora_A" in n)


class _FixedDropout(torch.nn.Module):
    """Dropout with a mask fixed by ``seed`` (the same in litpeft's and peft's layer of the same name)."""

    def __init__(self, seed: int, p: float = 0.3) -> None:
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        keep = (torch.rand(x.shape, generator=g) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_with_dropout_in_train_mode_equals_peft(arch: str) -> None:
    """peft's DoRA applies the dropout to x in the magnitude term too (W x + (m/||W'|| - 1) W drop(x) +
    m/||W'|| s B A drop(x)): with the same weights and the same masks, the same outputs and gradients."""
    from peft.tuners.lora import LoraLayer

    base = load_model(f"tiny:{arch}")
    ours = LoRA(r=4, alpha=12, use_dora=True, dropout=0.3).apply(copy.deepcopy(base)).eval()
    _randomize_lora(ours)
    config = LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_dora=True, lora_dropout=0.3)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    theirs_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            if p.requires_grad:
                key = name.replace("lora_A.weight", "lora_A.default.weight").replace(
                    "lora_B.weight", "lora_B.default.weight"
                )
                key = key.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
                theirs_params["base_model.model." + key].copy_(p)
    theirs_layers = dict(theirs.base_model.model.named_modules())
    for seed, (name, layer) in enumerate(
        (n, m) for n, m in ours.named_modules() if isinstance(m, LoRALinear)
    ):
        peft_layer = theirs_layers[name]
        assert isinstance(peft_layer, LoraLayer)
        layer.lora_dropout = _FixedDropout(seed)
        peft_layer.lora_dropout["default"] = _FixedDropout(seed)
        layer.train()  # the adapted layers only: the base's own dropout (GPT-2) stays off
        peft_layer.train()
    x = _inputs()
    out_ours, out_theirs = ours(x).logits, theirs(x).logits
    assert not torch.allclose(out_ours, ours.eval()(x).logits, atol=1e-4)  # the masks do change the output
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    for name, p in ours.named_parameters():
        if name.endswith("lora_magnitude_vector"):
            ref = theirs_params[f"base_model.model.{name}.default.weight"].grad
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", {"use_dora": True}),
        ("gpt2", {"use_dora": True, "bias": "all"}),
        ("qwen2", {"bias": "lora_only"}),
    ],
)
def test_peft_export_keys_are_the_ones_peft_saves(arch: str, kwargs: dict) -> None:
    """``to_peft`` names each tensor as peft's own ``get_peft_model_state_dict`` does (DoRA's magnitude:
    ``<layer>.lora_magnitude_vector``, without ``.weight``)."""
    from peft import get_peft_model_state_dict

    base = load_model(f"tiny:{arch}")
    method = LoRA(r=4, **kwargs)
    ours = method.apply(copy.deepcopy(base))
    config, tensors = method.to_peft(ours, method.adapter_state_dict(ours))
    peft_config = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "use_dora", "bias")}
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(**peft_config, fan_in_fan_out=config["fan_in_fan_out"])
    )
    expected = get_peft_model_state_dict(theirs)
    assert set(tensors) == set(expected)
    assert all(tensors[k].shape == v.shape for k, v in expected.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_in_place_merge_and_unmerge(arch: str, use_dora: bool) -> None:
    """``LoRALinear.merge`` folds the adapter into the base weight (same outputs, one matmul);
    ``unmerge`` gives the base weights back within fp32 rounding and the same outputs again; the base
    model while merged (``adapters_disabled``) is the base model."""
    base = load_model(f"tiny:{arch}")
    model = LoRA(r=4, alpha=8, use_dora=use_dora).apply(copy.deepcopy(base)).eval()
    _randomize_lora(model)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    weights = [m.base_layer.weight.detach().clone() for m in layers]
    x = _inputs()
    with torch.no_grad():
        before = model(x).logits
        for m in layers:
            m.merge()
            m.merge()  # idempotent
        assert all(m.merged for m in layers)
        assert not torch.equal(layers[0].base_layer.weight, weights[0])
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
        for m in layers:
            m.unmerge()
        assert not any(m.merged for m in layers)
        for m, w in zip(layers, weights, strict=True):
            torch.testing.assert_close(m.base_layer.weight, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
        for m in layers:
            m.merge()
        with adapters_disabled(model):
            torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)


def test_in_place_merge_refuses_a_quantized_base() -> None:
    from litpeft.quantize import quantize_model

    model = load_model("tiny:llama")
    quantize_model(model, "nf4")
    LoRA(r=4, target_modules=["q_proj"]).apply(model)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert not layer.can_merge_in_place()
    with pytest.raises(LitPeftError, match="merges in place into a float"):
        layer.merge()
