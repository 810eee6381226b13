"""One base model and several adapters in memory at once, the base's weights held once.

Each adapter gets its own copy of the base's module tree whose frozen parameters and buffers are the
base's own tensors (``copy.deepcopy`` with those tensors pre-filled in its memo), then the adapter's
method is applied to that copy. Every method works unchanged this way (LoRA wraps layers of the copy,
prompt tuning hooks the copy's decoder, prefix tuning and LLaMA-Adapter attach state to the copy's
attention modules), the memory is one base plus the adapters' own tensors, and a request can only ever
run the model its ``model`` field names: there is no shared switch to flip between requests. A base
tensor a method trains in place (a norm) is copied for that adapter before its weights are loaded.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from litpeft.adapter_dir import base_fingerprint, read_adapter_config, read_adapter_weights
from litpeft.data.prompts import get_style
from litpeft.errors import LitPeftError
from litpeft.inference import LoadedModel, parse_device, parse_dtype
from litpeft.methods import method_from_config
from litpeft.models import load_model, load_tokenizer
from litpeft.quantize import quantize_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSpec:
    """What to serve: the base spec and name, and ``name -> adapter directory``."""

    base: str
    base_name: str
    adapters: dict[str, str]
    dtype: str | None = None
    prompt_style: str | None = None
    trust_remote_code: bool = False
    allow_other_base: bool = False

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def parse_adapters(items: list[str]) -> dict[str, str]:
    """``["name=DIR", "DIR", ...]`` -> ``{name: DIR}``; a bare ``DIR`` is named after its folder."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise LitPeftError(f"--adapter '{item}': write NAME=DIR (or DIR)")
        if name in out:
            raise LitPeftError(f"--adapter: the name '{name}' is given twice")
        out[name] = path
    return out


def plan(
    adapters: dict[str, str],
    model: str | None,
    base_name: str | None = None,
    **options: object,
) -> ServeSpec:
    """Check the adapter directories (cheap: their ``adapter.yaml``) and settle the base and names."""
    metas = {name: read_adapter_config(d) for name, d in adapters.items()}
    bases = sorted({m["base_model"] for m in metas.values()})
    if model is None:
        if not bases:
            raise LitPeftError("give --model SPEC (the base) or at least one --adapter")
        if len(bases) > 1:
            raise LitPeftError(
                f"the adapters were trained on different bases ({', '.join(bases)}); one server holds one "
                "base: choose it with --model (adapters trained on another base need --allow_other_base)"
            )
        model = bases[0]
    quants = sorted({str(m.get("quantize")) for m in metas.values()})
    if len(quants) > 1:
        raise LitPeftError(f"the adapters were trained on differently quantized bases ({', '.join(quants)})")
    name = base_name or model
    if name in adapters:
        raise LitPeftError(f"the base's name '{name}' is also an adapter's; choose another with --base_name")
    return ServeSpec(model, name, dict(adapters), **options)  # type: ignore[arg-type]


def load_served(spec: ServeSpec, device: str) -> dict[str, LoadedModel]:
    """``name -> LoadedModel`` for the base and every adapter, in eval mode on ``device``."""
    tokenizer = load_tokenizer(spec.base, trust_remote_code=spec.trust_remote_code)
    base = load_model(
        spec.base, parse_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, tokenizer=tokenizer
    )
    metas = {name: read_adapter_config(d) for name, d in spec.adapters.items()}
    for name, meta in metas.items():
        fingerprint = meta.get("base_fingerprint")
        if not spec.allow_other_base and fingerprint and fingerprint != base_fingerprint(base):
            raise LitPeftError(
                f"adapter '{name}' was trained on base '{meta['base_model']}', whose weights differ from "
                f"'{spec.base}'; --allow_other_base true serves it anyway"
            )
    quantize = next((m["quantize"] for m in metas.values() if m.get("quantize")), None)
    if quantize:
        log.info(
            "the adapters were trained on a %s-quantized base: the base is quantized the same way", quantize
        )
        quantize_model(base, quantize)
    base.to(parse_device(device)).eval()
    served = {
        spec.base_name: LoadedModel(
            base, tokenizer, get_style(spec.prompt_style or "auto", tokenizer), spec.base
        )
    }
    for name, meta in metas.items():
        model = _share_base(base)
        method = method_from_config(meta["method"])
        weights = read_adapter_weights(spec.adapters[name])
        method.apply(model, saved=weights)
        _own_trained(model, base)
        method.load_adapter_state_dict(model, weights)
        model.to(base.device).eval()
        style = get_style(spec.prompt_style or meta.get("prompt_style") or "auto", tokenizer)
        served[name] = LoadedModel(model, tokenizer, style, spec.base, method, spec.adapters[name])
        log.info("adapter '%s' (%s) loaded from %s", name, method.name, spec.adapters[name])
    return served


def _share_base(base: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``base``'s modules whose parameters and buffers are ``base``'s own tensors."""
    memo: dict[int, object] = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def _own_trained(model: PreTrainedModel, base: PreTrainedModel) -> None:
    """Give ``model`` its own copy of each base tensor its method trains in place (the norms of
    LLaMA-Adapter v2 and the bottleneck adapters): loading the adapter must not write into the base."""
    shared = {id(p) for p in base.parameters()}
    own: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) in shared:
                if id(p) not in own:  # tied tensors stay tied
                    own[id(p)] = nn.Parameter(p.detach().clone())
                module._parameters[key] = own[id(p)]
