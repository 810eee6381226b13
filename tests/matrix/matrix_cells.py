"""One cell of the method x precision x data path x base x family matrix, run as ``litpeft fit`` runs it.

A cell builds ``PeftLM(tiny:<family>, <method from configs/<method>.yaml>)`` and drives it through
Lightning's ``Trainer`` with the real precision plugin (a sanity validation pass, then ``STEPS`` steps
with the config's optimizer, LR and weight decay, no warmup, on right-padded batches), then checks, on
the trained model:

- every trainable tensor and its AdamW state is fp32 and every trainable tensor has moved;
- packed: the loss of a packed row equals the loss of the same samples padded (the trainer's precision);
- left-padded generation: greedy ``generate`` with the KV cache equals it without;
- the adapter directory ``fit`` wrote reloads (``load_adapter``) with the same logits;
- where peft has the method, its export loads in peft with the same logits (32-true, plain base);
  where it has not, the export is refused with one line.

A method that cannot work on a family is refused by ``configure_model`` (``LitPeftError``); the cell
returns that refusal instead.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import peft
import torch
import yaml
from adapter_helpers import REPO, token_ids, write_jsonl
from safetensors.torch import save_file

from litpeft import InstructionDataModule, PeftLM
from litpeft.adapter_dir import load_adapter
from litpeft.data.collate import pack_batch, pad_batch
from litpeft.errors import LitPeftError
from litpeft.export import to_peft
from litpeft.methods import PeftMethod, method_from_config
from litpeft.models import load_model

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from method_helpers import batch_of, greedy_with_cache_equals_without  # noqa: E402

STEPS = 3
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
BASES = ("plain", "nf4")
#: matrix name -> (config file, init_args overrides). QLoRA is LoRA on an nf4 base (configs/qlora.yaml).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "dora": ("lora", {"use_dora": True}),
    "qlora": ("qlora", {}),
    "prompt_tuning": ("prompt_tuning", {}),
    "p_tuning": ("p_tuning", {}),
    "prefix_tuning": ("prefix_tuning", {}),
    "p_tuning_v2": ("p_tuning_v2", {}),
    "adapter": ("adapter", {}),
    "llama_adapter": ("llama_adapter", {"adapter_layers": 2}),  # the config's 28 > the tiny models' 2
    "llama_adapter_v2": ("llama_adapter_v2", {"adapter_layers": 2}),
    "ia3": ("ia3", {}),
    "ln_tuning": ("ln_tuning", {}),
    "bitfit": ("bitfit", {}),
    "vera": ("vera", {}),
    "loha": ("loha", {}),
    "lokr": ("lokr", {}),
    "adalora": ("adalora", {"tinit": 0, "tfinal": 1}),  # the config's schedule is longer than STEPS
    "pissa": ("lora", {"init": "pissa"}),
    "loftq": ("lora", {"init": "loftq", "loftq_iter": 2}),
    "oft": ("oft", {}),
}
FAMILIES = (
    "llama",
    "llama3",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
    "granite",
)
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

# Tolerances: fp32 paths agree to rounding; bf16 paths compute in another order (packed vs padded rows,
# a reload), each op with bf16's 2^-8 relative spacing, on the tiny models' O(1) logits.
TOL = {"32-true": 1e-4, "bf16-mixed": 3e-2, "bf16-true": 3e-2}
# Packed vs padded losses: measured exactly equal (0.0) in every family for the methods that pack
# correctly, in bf16 too; the known packing defect gives 0.0017 (Granite, whose residual multiplier
# damps the soft prompt) to 0.19.
LOSS_TOL = {"32-true": 1e-5, "bf16-mixed": 1e-4, "bf16-true": 1e-4}


def method_config(name: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """``(method config, optimizer config, quantize)`` of a matrix method, read from its shipped YAML."""
    file, overrides = METHODS[name]
    config = yaml.safe_load((REPO / "configs" / f"{file}.yaml").read_text())
    method = copy.deepcopy(config["model"]["init_args"]["method"])
    method.setdefault("init_args", {}).update(overrides)
    return method, config["optimizer"], config["model"]["init_args"].get("quantize")


def rows() -> list[dict[str, str]]:
    """Eight rows of a tiny instruction task of differing lengths."""
    words = ["apple", "river", "stone", "cloud", "tigers", "lemonade", "ocean", "pianos"]
    return [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in words]


@dataclass
class Cell:
    family: str
    method: str
    precision: str
    base: str = "plain"

    @property
    def quantize(self) -> str | None:
        return "nf4" if self.base == "nf4" or self.method == "qlora" else None

    @property
    def id(self) -> str:
        return f"{self.family}-{self.method}-{self.precision}-{self.base}"


@dataclass
class Outcome:
    refused: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


class _Snapshot(L.Callback):
    """The trainable tensors as training starts (after the sanity validation pass)."""

    def on_train_start(self, trainer: L.Trainer, module: PeftLM) -> None:
        self.start = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}


def build_module(cell: Cell, adapter_dir: Path) -> PeftLM:
    """The cell's PeftLM with the config's method and optimizer (its LR and weight decay; no warmup)."""
    method, optimizer, _ = method_config(cell.method)
    if "tokenizer" in method["init_args"] and method["init_args"]["tokenizer"] is None:
        method["init_args"]["tokenizer"] = f"tiny:{cell.family}"  # the shipped configs' base has its own
    module = PeftLM(
        model=f"tiny:{cell.family}",
        method=method_from_config(method),
        quantize=cell.quantize,
        adapter_dir=str(adapter_dir),
    )
    module.optimizer_init = optimizer
    return module


def fit(cell: Cell, tmp: Path) -> tuple[PeftLM, L.Trainer, _Snapshot]:
    """``litpeft fit``'s path: Trainer(precision) -> configure_model -> sanity validation -> STEPS steps."""
    L.seed_everything(0, verbose=False)
    module = build_module(cell, tmp / "adapter")
    data = InstructionDataModule(
        train_file=str(write_jsonl(tmp / "train.jsonl", rows())),
        val_fraction=0.25,
        batch_size=3,
        max_seq_length=64,
    )
    snapshot = _Snapshot()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        precision=cell.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        callbacks=[snapshot],
        default_root_dir=tmp,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return module, trainer, snapshot


def run_cell(cell: Cell, tmp: Path) -> Outcome:
    """Train the cell and run every check, collecting each check's failure (``Outcome.failures``) so that
    one known defect does not hide the others; a refusal at setup (``LitPeftError``) is the outcome."""
    out = Outcome()
    if cell.quantize and not HAS_BNB:
        out.refused = _refusal(lambda: PeftLM(model=f"tiny:{cell.family}", quantize="nf4").configure_model())
        assert "bitsandbytes" in out.refused, out.refused
        return out
    try:
        module, trainer, snapshot = fit(cell, tmp)
    except LitPeftError as e:
        assert "\n" not in str(e), f"a refusal is one line: {e}"
        out.refused = str(e)
        return out
    except Exception as e:  # noqa: BLE001 (a crash in training is this cell's failure)
        out.failures["fit"] = f"{type(e).__name__}: {e}".splitlines()[0]
        return out
    model = module.model.eval()
    checks: dict[str, Callable[[], Any]] = {
        "trainables": lambda: check_trainables(module, trainer, snapshot),
        "packed": lambda: check_packed_equals_padded(module, trainer, cell),
        "generate": lambda: check_generation(model, module.tokenizer),
        "reload": lambda: check_reload(module, trainer, cell, tmp / "adapter"),
    }
    if cell.precision == "32-true" and cell.quantize is None:
        checks["peft"] = lambda: check_peft_export(module, tmp)
    for name, check in checks.items():
        try:
            out.checks[name] = check()
        except Exception as e:  # noqa: BLE001
            out.failures[name] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def _refusal(fn: Any) -> str:
    try:
        fn()
    except LitPeftError as e:
        return str(e)
    raise AssertionError("expected a refusal (LitPeftError)")


def check_trainables(module: PeftLM, trainer: L.Trainer, snapshot: _Snapshot) -> None:
    """Every trainable tensor and its AdamW state is fp32; every trainable tensor moved in STEPS steps."""
    assert trainer.global_step == STEPS
    optimizer = trainer.optimizers[0]
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        assert p.dtype == torch.float32, f"{name} is {p.dtype}"
        state = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32, f"{name}'s {key} is {state[key].dtype}"
        assert not torch.equal(p.detach().float(), snapshot.start[name]), f"{name} did not move"


def _samples(tok: Any) -> list[dict[str, list[int]]]:
    texts = [("Reverse: apple", " elppa"), ("Reverse the word: lemonade", " edanomel"), ("Say: ok", " ok")]
    out = []
    for prompt, answer in texts:
        p, a = (
            tok(prompt, add_special_tokens=False).input_ids,
            tok(answer, add_special_tokens=False).input_ids,
        )
        out.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return out


def check_packed_equals_padded(module: PeftLM, trainer: L.Trainer, cell: Cell) -> float:
    """The loss of three samples packed in one row equals their loss padded, one per row."""
    samples = _samples(module.tokenizer)
    packed = pack_batch([samples], module.tokenizer.pad_token_id)
    padded = pad_batch(samples, module.tokenizer.pad_token_id)
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        a = module.loss_and_accuracy(packed)[0].float().item()
        b = module.loss_and_accuracy(padded)[0].float().item()
    assert abs(a - b) <= LOSS_TOL[cell.precision], f"packed loss {a} != padded loss {b}"
    return abs(a - b)


def check_generation(model: torch.nn.Module, tok: Any) -> list[list[int]]:
    """Greedy generation of a left-padded batch, as ``model`` is after ``fit``: with cache = without."""
    enc = batch_of(tok, ["Reverse: apple", "Say something long: ok"], side="left")
    with torch.no_grad():
        out = greedy_with_cache_equals_without(model, enc, tok.pad_token_id, max_new_tokens=6)
    tok.padding_side = "right"
    return out.tolist()


def _ids(tok: Any) -> dict[str, torch.Tensor]:
    enc = batch_of(tok, ["Reverse the word: maple", "Hi"], side="right")
    tok.padding_side = "right"
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def check_reload(module: PeftLM, trainer: L.Trainer, cell: Cell, adapter: Path) -> float:
    """The adapter directory ``fit`` wrote, loaded on a base in the precision's dtype, gives the logits of
    the trained model (both under the trainer's precision context)."""
    dtype = torch.bfloat16 if cell.precision == "bf16-true" else None
    loaded, tok, _, _ = load_adapter(adapter, dtype=dtype)
    ids = _ids(tok)
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        ours = module.model(**ids).logits.float()
        theirs = loaded(**ids).logits.float()
    keep = ids["attention_mask"].bool()
    diff = (ours[keep] - theirs[keep]).abs().max().item()
    assert diff <= TOL[cell.precision] * max(1.0, ours[keep].abs().max().item()), f"reload differs by {diff}"
    return diff


def check_peft_export(module: PeftLM, tmp: Path) -> str | float:
    """peft's model of the exported adapter gives litpeft's logits (1e-5); without a peft form: refused."""
    method: PeftMethod = module.method
    model = module.model
    try:
        config, tensors = to_peft(model, method, method.adapter_state_dict(model), module.model_spec)
    except LitPeftError as e:
        return f"refused: {e}"
    out = tmp / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    base = load_model(module.model_spec, tokenizer=module.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = token_ids()  # no padding: peft's prompt-learning models take no mask for the virtual tokens
    with torch.no_grad():
        ours, peft_logits = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    # peft strips the virtual tokens' logits only for some output classes (not Qwen3-MoE's): the real
    # tokens are the last ones either way
    diff = (ours - peft_logits[:, -ours.shape[1] :]).abs().max().item()
    assert diff <= 1e-4, f"peft's logits differ by {diff}"
    return diff
