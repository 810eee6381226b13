"""LoRA's inits from the base weight (PiSSA, OLoRA, LoftQ): peft's A, B and base; the trained adapter
reloads, exports and merges onto the original base."""

from __future__ import annotations

import copy
import inspect

import method_helpers as helpers
import peft.utils.loftq_utils as peft_loftq
import pytest
import torch
from adapter_helpers import logits, token_ids
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_layer

from litpeft import PeftLM
from litpeft.adapter_dir import load_adapter, save_adapter
from litpeft.commands import export_adapter
from litpeft.data.prompts import get_style
from litpeft.errors import LitPeftError
from litpeft.export import merge
from litpeft.methods import LoRA, LoRALinear
from litpeft.methods.lora_init import NITER_SEED
from litpeft.models import load_model
from litpeft.quantize import QuantizedLinear
from litpeft.serve.models import ServeSpec, load_served


def _peft_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's LoftQ with its fixed ``compute_device = "cuda"`` set to the CPU (its code otherwise as is), and its
    randomized SVD seeded in every layer as litpeft seeds it (its math as is)."""
    source = inspect.getsource(peft_loftq.loftq_init).replace('"cuda"', '"cpu"')
    namespace = dict(vars(peft_loftq))
    exec(source, namespace)  # noqa: S102 - peft's own function text, device string changed
    monkeypatch.setattr(peft_layer, "loftq_init", namespace["loftq_init"])
    svd_lowrank = peft_layer.svd_lowrank

    def seeded(*args: object, **kwargs: object) -> object:
        torch.manual_seed(NITER_SEED)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)


def _peft_config(init: str, loftq_iter: int, **kwargs: object) -> LoraConfig:
    loftq = {"loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter)} if init == "loftq" else {}
    return LoraConfig(target_modules="all-linear", init_lora_weights=init, **loftq, **kwargs)


@pytest.mark.parametrize(
    "arch, init, loftq_iter, dora",
    [
        ("llama", "pissa", 1, False),
        ("gpt2", "pissa", 1, False),
        ("qwen2", "pissa_niter_2", 1, False),
        ("llama", "olora", 1, False),
        ("llama", "olora", 1, True),
        ("llama", "loftq", 1, False),
        ("qwen2", "loftq", 3, False),
    ],
)
def test_a_b_and_base_weight_equal_peft(
    monkeypatch: pytest.MonkeyPatch, arch: str, init: str, loftq_iter: int, dora: bool
) -> None:
    """Also DoRA's magnitude, ``||W_base + s B A||`` (not the rewritten base's norms)."""
    _peft_on_cpu(monkeypatch)
    base = load_model(f"tiny:{arch}")
    method = LoRA(r=4, alpha=8, init=init, loftq_iter=loftq_iter, use_dora=dora)
    ours = method.apply(copy.deepcopy(base)).eval()
    config = _peft_config(init, loftq_iter, r=4, lora_alpha=8, use_dora=dora)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    peft_layers = dict(theirs.base_model.model.named_modules())
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert layers
    for name, layer in layers:
        other = peft_layers[name]
        for mine, reference in [
            (layer.lora_A.weight, other.lora_A["default"].weight),
            (layer.lora_B.weight, other.lora_B["default"].weight),
            (layer.base_layer.weight, other.base_layer.weight),  # LoftQ's: nf4 codes, dequantized
        ]:
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5, msg=name)
        if dora:
            magnitude = other.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(layer.lora_magnitude_vector, magnitude, rtol=1e-5, atol=1e-5)
        assert isinstance(layer.base_layer, QuantizedLinear) == (init == "loftq")
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)
    if init != "loftq":  # step 0 is the base model; LoftQ's (alpha = 2 r) is not, as in peft
        torch.testing.assert_close(logits(ours, x), logits(base, x), rtol=1e-4, atol=1e-4)


def _trained_adapter(tmp_path, spec: str, method: LoRA) -> tuple[PeftLM, torch.Tensor]:
    """Three AdamW steps of ``method`` on ``spec``; the adapter saved to ``tmp_path / "adapter"``."""
    torch.manual_seed(0)
    module = PeftLM(model=spec, method=method)
    module.configure_model()
    batch = helpers.labelled_batch(["the quick brown fox", "jumps over the lazy dog"])
    helpers.train_module(module, batch, steps=3, lr=1e-2)
    module.model.eval()
    save_adapter(tmp_path / "adapter", module, get_style("alpaca", module.tokenizer))
    return module, logits(module.model, token_ids())


@pytest.mark.parametrize(
    "spec, kwargs",
    [
        ("tiny:llama", {"init": "pissa", "use_rslora": True}),
        ("tiny:gpt2", {"init": "pissa_niter_2", "bias": "lora_only"}),
        ("tiny:qwen2", {"init": "olora", "use_dora": True}),
        ("tiny:llama", {"init": "loftq", "loftq_iter": 2}),
    ],
)
def test_trained_adapter_loads_exports_and_merges_on_the_original_base(
    tmp_path, spec: str, kwargs: dict
) -> None:
    """After a few steps: the saved adapter on the hub's base gives the trained logits; so does its peft
    export (PiSSA/OLoRA: a rank-2r LoRA) on the original base in peft, and the merged model."""
    module, trained = _trained_adapter(tmp_path, spec, LoRA(r=4, alpha=8, **kwargs))
    base_logits = logits(load_model(spec), token_ids())
    assert not torch.allclose(trained, base_logits, atol=1e-3)

    loaded, _, method, _ = load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, token_ids()), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merge(loaded, method), token_ids()), trained, rtol=1e-5, atol=1e-5)

    if kwargs["init"] == "loftq":
        with pytest.raises(LitPeftError, match="init 'loftq' rewrites the base as nf4 codes"):
            export_adapter(str(tmp_path / "adapter"), str(tmp_path / "peft"))
        return
    export_adapter(str(tmp_path / "adapter"), str(tmp_path / "peft"))
    theirs = PeftModel.from_pretrained(load_model(spec), str(tmp_path / "peft")).eval()
    assert theirs.peft_config["default"].r == 8
    torch.testing.assert_close(logits(theirs, token_ids()), trained, rtol=1e-5, atol=1e-5)


def test_loading_and_serving_rebuild_the_base_from_the_stored_offsets(tmp_path, monkeypatch) -> None:
    """Loading rebuilds the base from the stored offsets (no SVD runs); ``litpeft serve``, whose adapters
    share the base's tensors, serves the adapter and leaves the base it shares untouched."""
    _, trained = _trained_adapter(tmp_path, "tiny:llama", LoRA(r=4, init="pissa"))
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD at load"))
    loaded, _, _, _ = load_adapter(tmp_path / "adapter")
    assert loaded.model.layers[0].self_attn.q_proj.base_offset is not None
    served = load_served(ServeSpec("tiny:llama", "base", {"a": str(tmp_path / "adapter")}), "cpu")
    torch.testing.assert_close(logits(served["a"].model, token_ids()), trained, rtol=1e-5, atol=1e-5)
    plain = logits(load_model("tiny:llama"), token_ids())
    torch.testing.assert_close(logits(served["base"].model, token_ids()), plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, kwargs, quantize, match",
    [
        (
            "tiny:llama",
            {"init": "pissa"},
            "nf4",
            "init 'pissa' decomposes the float base weight, but the layer",
        ),
        ("tiny:llama", {"init": "loftq"}, "nf4", "leave model.quantize null"),
        ("tiny:gpt2", {"init": "olora"}, None, "init 'olora' does not work on GPT-2's Conv1D"),
        ("tiny:llama", {"init": "pissa", "r": 512}, None, "init 'pissa' needs r <= "),
    ],
)
def test_inits_that_cannot_apply_refuse_in_one_line(
    spec: str, kwargs: dict, quantize: str | None, match: str
) -> None:
    module = PeftLM(model=spec, method=LoRA(**kwargs), quantize=quantize)
    with pytest.raises(LitPeftError, match=match) as error:
        module.configure_model()
    assert "\n" not in str(error.value)


def test_bad_init_names_the_choices() -> None:
    with pytest.raises(
        ValueError, match="init: 'pissa_niter_' is not allowed; one of: kaiming, gaussian, pissa"
    ):
        LoRA(init="pissa_niter_")
    with pytest.raises(ValueError, match="loftq_iter: 0 is not allowed"):
        LoRA(init="loftq", loftq_iter=0)
    assert LoRA(init="pissa_niter_16").config()["init_args"]["init"] == "pissa_niter_16"
