"""The method interface: what every PEFT method provides, and the registry of methods by short name.

A method is a small configurable object (its ``__init__`` arguments are its config, which jsonargparse
reads from YAML) that changes a Hugging Face causal LM in place. The one rule that makes everything else
generic: after :meth:`PeftMethod.apply`, exactly the method's tensors have ``requires_grad=True``. The
optimizer, the adapter-only checkpoints and the adapter directory all use that one fact.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from litpeft.errors import InvalidArgument, LitPeftError, check
from litpeft.methods.families import check_family
from litpeft.registry import resolve_class
from litpeft.speedups import SPEEDUPS

METHODS: dict[str, type[PeftMethod]] = {}


class PeftLayer:
    """Mixin for modules a method inserts. ``disabled=True`` makes the layer act as the base model."""

    disabled: bool = False

    def fp32_base_layers(self) -> list[nn.Module]:
        """Frozen base layers this layer reads in fp32 (e.g. DoRA's column norms of the base weight).

        The precision policy (:func:`litpeft.precision.store_frozen_linears`) leaves them in fp32.
        """
        return []


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks take 16 random bits per element from 64-bit random words.

    PyTorch's CPU dropout draws one Mersenne-Twister number per element: a mask for 632 x 1536
    activations takes about 12-18 ms at 2 threads, 50x the multiply it feeds, and LoRA draws one per
    adapted layer and step. Four 16-bit slices of each random int64 need 4x fewer draws. The drop
    probability is ``p`` rounded to a multiple of 1/65536 (off by at most 7.7e-6) and the kept values are
    scaled by the exact inverse of that keep probability, so the output stays unbiased. The masks come
    from torch's CPU generator, so seeding and gradient checkpointing's RNG replay work as for
    ``nn.Dropout``. On other devices, in eval mode, in place and with ``SPEEDUPS.fast_dropout`` off it is
    ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = round(self.p * 65536)
        if (
            not SPEEDUPS.fast_dropout
            or not self.training
            or x.device.type != "cpu"
            or self.inplace
            or not 0 < drop < 65536
        ):
            return super().forward(x)
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-32768, 32767]
        keep = (bits >= drop - 32768).to(x.dtype).mul_(65536 / (65536 - drop))
        return x * keep


class PeftMethod:
    """Base class of all PEFT methods. Subclass it, set ``name``, implement :meth:`inject`.

    Subclasses store every ``__init__`` argument as an attribute of the same name, so that
    :meth:`config` can write the method into an adapter directory and :func:`method_from_config` can
    build it again.
    """

    name: ClassVar[str] = ""
    #: AdamW's LR when the user sets none (``litpeft fit``; the method's configs/<method>.yaml value).
    learning_rate: ClassVar[float] = 2e-4
    # -- declared capabilities (as peft's), checked by ``litpeft merge/export`` before a model is loaded ---
    #: Whether :meth:`merge` folds the method into the base weights.
    mergeable: ClassVar[bool] = False
    #: Whether :meth:`to_peft` maps it to a Hugging Face peft adapter. A subclass that overrides
    #: ``to_peft`` without declaring this is taken as exportable.
    exportable_to_peft: ClassVar[bool] = False
    #: The one-line error when not mergeable / not exportable ("": a generic one naming the method).
    not_mergeable_reason: ClassVar[str] = ""
    not_exportable_reason: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "exportable_to_peft" not in cls.__dict__ and "to_peft" in cls.__dict__:
            cls.exportable_to_peft = True
        if cls.name and cls.name not in METHODS:
            METHODS[cls.name] = cls

    def merge_refusal(self) -> str | None:
        """``None`` when this method (with its config) can be merged, else why not, in one line."""
        if self.mergeable:
            return None
        return self.not_mergeable_reason or (
            f"method '{self.name}' cannot be merged into the base weights (it is not a weight update); "
            "use the adapter directory as is (litpeft generate --adapter) or export it (litpeft export)"
        )

    def peft_refusal(self) -> str | None:
        """``None`` when this method (with its config) has a peft form, else why not, in one line.

        Override it where the answer depends on the config. What depends on the model (e.g. the
        architecture) is checked by :meth:`to_peft` itself.
        """
        if self.exportable_to_peft:
            return None
        return self.not_exportable_reason or (
            f"method '{self.name}' has no Hugging Face peft equivalent to export to"
        )

    # -- the part a method implements -------------------------------------------------------------
    def inject(self, model: PreTrainedModel) -> None:
        """Insert the method's layers into ``model`` (in place). Parameters it creates must be trainable."""
        raise NotImplementedError(f"{type(self).__name__} must implement inject()")

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Fold the method into the base weights; return a plain HF model without method layers."""
        refuse(self.merge_refusal())
        raise NotImplementedError(f"{type(self).__name__} declares mergeable but does not implement merge()")

    def unmerged_part(self, model: PreTrainedModel) -> tuple[PeftMethod, dict[str, torch.Tensor]] | None:
        """What :meth:`merge` leaves out, as ``(method, tensors)`` for an adapter of the merged model.

        Call it before :meth:`merge`. ``None`` (the default): merge folds in everything.
        """
        return None

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Hugging Face ``peft`` form of the adapter: ``(adapter_config, adapter_state_dict)``."""
        refuse(self.peft_refusal())
        raise NotImplementedError(f"{type(self).__name__} declares exportable_to_peft but has no to_peft()")

    # -- training hooks (PeftLM calls them; the defaults do nothing) ------------------------------------
    def training_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each training step's loss (e.g. AdaLoRA's orthogonality regulariser), or None."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps`` (the trainer's estimate; 0: no
        bound), the gradients still there."""

    def training_state(self, model: nn.Module) -> dict[str, Any]:
        """State :meth:`after_optimizer_step` keeps across steps, saved in every checkpoint ({}: none)."""
        return {}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned (a resumed run continues as the uninterrupted one)."""

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that make up the trained adapter (default: every trainable parameter)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` returned into a model this method was applied to."""
        own = dict(model.named_parameters())
        expected = set(self.adapter_state_dict(model))
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - set(own) - expected)
        if missing or unexpected:
            raise LitPeftError(
                f"adapter does not fit the model: {len(missing)} missing tensors (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        with torch.no_grad():
            for k, v in state.items():
                if k not in own:  # a saved tensor that is no parameter (the method read it at apply)
                    continue
                if own[k].shape != v.shape:
                    raise LitPeftError(
                        f"adapter tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
                    )
                own[k].copy_(v)

    # -- shared behaviour ---------------------------------------------------------------------------
    def apply(self, model: PreTrainedModel, saved: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
        """Freeze the base, inject the method, and return the model (changed in place).

        ``saved``: the adapter's tensors when one is being loaded, for a method whose injection depends on
        them (LoRA's PiSSA/OLoRA/LoftQ inits rebuild the base from them); the others ignore it.
        """
        model.requires_grad_(False)
        check_family(self, model)  # one line when the method cannot work on this model family
        self.inject(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise LitPeftError(f"method '{self.name}' found nothing to train in {type(model).__name__}")
        return model

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``, the form jsonargparse and adapter directories use."""
        # jsonargparse's lazy_instance default is a generated subclass: describe the class it stands for.
        cls = next(
            c
            for c in type(self).__mro__
            if issubclass(c, PeftMethod) and not c.__name__.startswith("LazyInstance_")
        )
        params = inspect.signature(cls.__init__).parameters
        args = {
            k: getattr(self, k)
            for k in params
            if k != "self" and params[k].kind == params[k].POSITIONAL_OR_KEYWORD
        }
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config()["init_args"].items())
        return f"{self.config()['class_path'].rsplit('.', 1)[-1]}({args})"


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model: every :class:`PeftLayer` in it is switched off inside the block."""
    layers = [m for m in model.modules() if isinstance(m, PeftLayer)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.disabled = b


def refuse(reason: str | None) -> None:
    """Raise :class:`LitPeftError` with ``reason`` unless it is ``None`` (a capability check's answer)."""
    if reason is not None:
        raise LitPeftError(reason)


def check_arg(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A method's ``__init__`` check: ``InvalidArgument`` naming the argument unless ``ok``. The CLI shows
    it as ``model.method.init_args.<key>: <value> is not allowed; <allowed>``."""
    check(ok, key, value, allowed, scope="method")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_target_modules(target_modules: Any, key: str = "target_modules") -> None:
    """A non-empty string (a regex, a name or ``all-linear``) or a non-empty list of names."""
    if isinstance(target_modules, str):
        check_arg(bool(target_modules.strip()), key, target_modules, "a layer name, a regex or all-linear")
        try:
            re.compile(target_modules)
        except re.error as e:
            raise InvalidArgument(
                key, target_modules, f"not a valid regular expression ({e})", "method"
            ) from None
        return
    check_arg(
        isinstance(target_modules, (list, tuple))
        and len(target_modules) > 0
        and all(isinstance(t, str) and t for t in target_modules),
        key,
        target_modules,
        "a non-empty list of layer names, a regex or all-linear",
    )


def method_from_config(config: dict[str, Any]) -> PeftMethod:
    """Build a method from ``{"class_path", "init_args"}``: a short name or an import path to a PeftMethod.

    The built-in methods are registered: importing this module runs ``litpeft/methods/__init__.py`` first.
    """
    cls = resolve_class(config.get("class_path", ""), METHODS, PeftMethod, "method")
    try:
        return cls(**config.get("init_args", {}))
    except InvalidArgument as e:
        raise e.under("method.init_args.") from None


def _plain_name(text: str) -> bool:
    return re.fullmatch(r"\w+(\.\w+)*", text) is not None


def find_targets(
    model: nn.Module, target_modules: str | list[str], layer_types: tuple[type, ...]
) -> list[str]:
    """Names of modules of ``layer_types`` selected by ``target_modules``.

    Same rules as Hugging Face peft: a list matches a module whose name equals an entry or ends with
    ``"." + entry``; a string is a regular expression that must match the full name; ``"all-linear"``
    selects every linear layer except the output (LM head) layer. One addition: a string that matches no
    full name but is a plain name (``q_proj``, ``self_attn.q_proj``) is taken as that one name, where peft
    finds nothing (the regex ``q_proj`` never matches ``model.layers.0.self_attn.q_proj`` in full).
    """
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, layer_types) and module is not output_layer
    ]
    if target_modules == "all-linear":
        names = candidates
    elif isinstance(target_modules, str):
        names = [n for n in candidates if re.fullmatch(target_modules, n) is not None]
        if not names and _plain_name(target_modules):
            names = [n for n in candidates if n == target_modules or n.endswith("." + target_modules)]
    else:
        names = [n for n in candidates if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not names:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, layer_types)})
        what = "names" if isinstance(target_modules, list) else "a regex (full match) or name"
        raise InvalidArgument(
            "target_modules",
            target_modules,
            f"{what} that matched no layer; this model's layers are named: {', '.join(kinds)}",
            "method",
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (how a method wraps a layer: LoRA, bias/scale, norms)."""
    model.set_submodule(name, new)


def merge_layers(model: PreTrainedModel, layer_type: type | tuple[type, ...]) -> PreTrainedModel:
    """Put each ``layer_type`` layer's ``merged()`` in its place and freeze ``model`` (a method's merge)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            replace_module(model, name, module.merged())
    model.requires_grad_(False)
    return model


def peft_target_names(model: nn.Module, adapted: list[str]) -> list[str]:
    """A peft config's ``target_modules`` that selects exactly the ``adapted`` modules of ``model``.

    peft matches a list entry against a module name that equals it or ends with ``"." + entry``: the
    adapted modules' short names (``k_proj``) when no other module of ``model`` has one of them, else their
    full names. (A wrapped module's own children, ``<name>.base_layer`` and the like, keep other short names.)
    """
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    same_named = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in short}
    return short if same_named == set(adapted) else sorted(adapted)
