#!/usr/bin/env python3
"""Side-by-side training benchmark: litpeft vs transformers + peft (plain PyTorch loop, and HF Trainer).

Same base model, same tokenized batches in the same order, same hyperparameters (AdamW lr 2e-4, no weight
decay, batch 8), same precision, same number of steps. Every configuration runs in a fresh subprocess,
so peak resident memory (``VmHWM``) is per configuration, and configurations are alternated
(litpeft, peft, litpeft, ...) so that both sides see the same machine load.

    python scripts/benchmark.py                         # full run: writes docs/benchmark.md, .svg, .png
    python scripts/benchmark.py --report-only           # rewrite the page and plots from benchmark.json
    python scripts/benchmark.py --steps 2 --warmup 1 --no-large --out runs/bench   # smoke run
    python scripts/benchmark.py --profile               # torch.profiler of one litpeft LoRA step

What is measured, per configuration:

- tokens/s: real (non-padding) tokens per second, and tokens that carry loss per second, over the
  measured steps (after ``--warmup`` steps that are not counted);
- median step time: forward + backward + optimizer step (litpeft: Lightning's whole training batch);
- peak RSS: the worker process's ``VmHWM`` (imports, model, data and training together);
- MFU: achieved model FLOP/s over the machine's matmul peak, measured here in the same dtype
  (fp32 for ``32-true``, bf16 otherwise). Model FLOPs per step, with ``N`` the weights of all linear
  layers except the LM head (LoRA's A and B included), ``n_lora`` the trainable ones, ``L`` layers,
  ``d`` the attention width, ``T`` the padded length, ``V`` the vocabulary and ``h`` the hidden size::

      forward   2 N t + 4 L d T t + 2 h V t_head
      backward  2 N t + 8 L d T t + 2 h V t_head + 2 n_lora t

  over ``t`` real tokens. A frozen base needs activation gradients only (``2 N t``, not ``4 N t``);
  trainable weights add their own weight gradients. ``t_head`` is where the LM head runs: the
  loss-carrying positions for litpeft, every real position for transformers + peft.

A method is one entry of :data:`METHODS`: its litpeft config (by registered short name) and, where peft
has it, the peft config. A method this checkout does not have is reported, never skipped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEED = 42
BATCH_SIZE = 8
LR = 2e-4

# -- what is compared ----------------------------------------------------------------------------------
# name: (litpeft method config, peft config factory name or None). Hyperparameters follow each paper's
# common setting; both sides get the same numbers.
METHODS: dict[str, dict[str, Any]] = {
    "lora": {  # dropout 0: both libraries' default
        "litpeft": {"class_path": "lora", "init_args": {"r": 16, "alpha": 32}},
        "peft": ("LoraConfig", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
    },
    "lora_dropout": {  # configs/lora.yaml's dropout 0.05: a random mask per adapted layer and step
        "litpeft": {"class_path": "lora", "init_args": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "peft": (
            "LoraConfig",
            {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        ),
    },
    "prompt_tuning": {
        "litpeft": {"class_path": "prompt_tuning", "init_args": {"num_virtual_tokens": 20}},
        "peft": ("PromptTuningConfig", {"num_virtual_tokens": 20}),
        "virtual_tokens": 20,
    },
    "p_tuning": {
        "litpeft": {"class_path": "p_tuning", "init_args": {"num_virtual_tokens": 20, "encoder": "mlp"}},
        "peft": ("PromptEncoderConfig", {"num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP"}),
        "virtual_tokens": 20,
    },
    "prefix_tuning": {
        "litpeft": {"class_path": "prefix_tuning", "init_args": {"num_virtual_tokens": 20}},
        "peft": ("PrefixTuningConfig", {"num_virtual_tokens": 20, "prefix_projection": True}),
        "virtual_keys": 20,
    },
    "p_tuning_v2": {
        "litpeft": {"class_path": "p_tuning_v2", "init_args": {"num_virtual_tokens": 20}},
        "peft": ("PrefixTuningConfig", {"num_virtual_tokens": 20, "prefix_projection": False}),
        "virtual_keys": 20,
    },
    "llama_adapter": {
        "litpeft": {"class_path": "llama_adapter", "init_args": {"adapter_len": 10}},
        "peft": ("AdaptionPromptConfig", {"adapter_len": 10, "adapter_layers": 30}),
        "virtual_keys": 10,
    },
    "llama_adapter_v2": {
        "litpeft": {"class_path": "llama_adapter_v2", "init_args": {"adapter_len": 10}},
        "peft": None,
        "virtual_keys": 10,
    },
    "houlsby": {
        "litpeft": {"class_path": "houlsby", "init_args": {"bottleneck_size": 64}},
        "peft": None,
    },
}

# A config-built Llama of about 0.5B parameters with random weights: a larger shape than SmolLM2-135M.
LARGE_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
SMOLLM2 = "smollm2-135m-instruct"


# -- helpers shared by workers and the driver -----------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_cache() -> Path:
    from litpeft.models import cache_dir

    path = cache_dir() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_files(variant: str) -> tuple[str, str]:
    """``(train, val)`` files: the bundled demo set (generated with the demo script if not bundled yet),
    or ``long``: the same rows, eight per sample, so samples are about 8x longer."""
    from litpeft.data.sources import DEMO_DIR

    train, val = DEMO_DIR / "train.jsonl", DEMO_DIR / "val.jsonl"
    if not train.is_file():
        out = bench_cache() / "demo"
        train, val = out / "train.jsonl", out / "val.jsonl"
        if not train.is_file():
            subprocess.run(
                [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(out)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
    if variant == "demo":
        return str(train), str(val)
    rows = [json.loads(x) for x in train.read_text().splitlines() if x.strip()]
    long_file = bench_cache() / "long_train.jsonl"
    if not long_file.is_file():
        with long_file.open("w") as f:
            for i in range(0, len(rows) - 7, 8):
                group = rows[i : i + 8]
                f.write(
                    json.dumps(
                        {
                            "instruction": group[0]["instruction"] + " One date per line.",
                            "input": "\n".join(r["input"] for r in group),
                            "output": "\n".join(r["output"] for r in group),
                        }
                    )
                    + "\n"
                )
    return str(long_file), str(val)


def model_spec(name: str) -> str:
    """``smollm2-135m-instruct`` or ``llama-0.5b`` (built once from :data:`LARGE_CONFIG`, random weights)."""
    if name != "llama-0.5b":
        return name
    target = bench_cache() / "llama-0.5b-random"
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from litpeft.models import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **LARGE_CONFIG,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16 on disk: half the size
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return str(target)


def method_available(name: str) -> str | None:
    """``None`` if litpeft in this checkout has the method, else why not."""
    import pkgutil

    import litpeft.methods as pkg
    from litpeft.methods import METHODS as REGISTRY

    for info in pkgutil.iter_modules(pkg.__path__):
        with contextlib.suppress(Exception):
            importlib.import_module(f"litpeft.methods.{info.name}")
    short = METHODS[name]["litpeft"]["class_path"]
    return None if short in REGISTRY else "not available in this checkout"


def model_flops(model: Any, tokens: int, padded_len: int, head_tokens: int, extra_keys: int = 0) -> float:
    """Model FLOPs of one training step (see the module docstring for the formula).

    ``N`` counts the linear layers inside the decoder blocks (base and method layers alike), so a
    reparameterization network that runs once per step (prefix tuning's MLP) is not counted per token.
    """
    import re

    from torch import nn

    block = re.compile(r"(^|\.)(layers|h)\.\d+\.")
    linear = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and block.search(n)]
    n_linear = sum(m.weight.numel() for m in linear)
    n_train = sum(m.weight.numel() for m in linear if m.weight.requires_grad)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_attention_heads * head_dim
    head = model.get_output_embeddings()
    head_flops = 2 * head.in_features * head.out_features
    attn = 4 * cfg.num_hidden_layers * width * (padded_len + extra_keys)
    forward = 2 * n_linear * tokens + attn * tokens + head_flops * head_tokens
    backward = 2 * n_linear * tokens + 2 * attn * tokens + head_flops * head_tokens + 2 * n_train * tokens
    return float(forward + backward)


# -- workers: one configuration each, in a fresh process --------------------------------------------------
class StepTimer:
    """Wall time and token counts of each training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.padded: list[int] = []
        self.cpu: list[float] = []  # process CPU seconds: with one thread, a load-independent A/B measure
        self._t0 = self._c0 = 0.0

    def start(self, batch: dict[str, Any]) -> None:
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.loss_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        self.padded.append(int(batch["input_ids"].shape[1]))
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def batches(spec: str, data: str, steps: int) -> list[dict[str, Any]]:
    """The first ``steps`` training batches exactly as litpeft's data module yields them."""
    from litpeft.data import InstructionDataModule
    from litpeft.models import load_tokenizer

    train, val = demo_files(data)
    dm = InstructionDataModule(train_file=train, val_file=val, batch_size=BATCH_SIZE, seed=SEED)
    dm.tokenizer = load_tokenizer(spec)
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == steps:
            return out
    raise SystemExit(f"only {len(out)} batches in {train}")


def run_litpeft(cfg: dict[str, Any], timer: StepTimer) -> dict[str, Any]:
    import lightning as L

    from litpeft.data import InstructionDataModule
    from litpeft.methods import method_from_config
    from litpeft.module import PeftLM

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            timer.start(batch)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            timer.stop()

    L.seed_everything(SEED, verbose=False)
    kwargs: dict[str, Any] = {}
    if cfg.get("quantize"):
        kwargs["quantize"] = cfg["quantize"]
    with tempfile.TemporaryDirectory() as tmp:
        module = PeftLM(
            model=model_spec(cfg["model"]),
            method=method_from_config(METHODS[cfg["method"]]["litpeft"]),
            adapter_dir=tmp,
            **kwargs,
        )
        if cfg.get("compile"):
            _compile_litpeft(module, cfg)
        _ablate(module, cfg.get("ablate", []))
        train, val = demo_files(cfg["data"])
        dm = InstructionDataModule(train_file=train, val_file=val, batch_size=BATCH_SIZE, seed=SEED)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=cfg["precision"],
            max_steps=cfg["warmup"] + cfg["steps"],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[Timing()],
        )
        timer.rss_before = rss_mb()
        trainer.fit(module, datamodule=dm)
        model = module.model
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"model": model, "n_trainable": n_lora, "head": "loss"}


def _lora_forward_before(self: Any, x: Any) -> Any:
    """``LoRALinear.forward`` before the speed work (for the ablation rows): autocast casts the input
    for the base layer and again for ``lora_A``, a bf16 input is first pulled back to fp32, and the
    scaling multiplies the full output."""
    result = self.base_layer(x)
    if self.disabled or self.merged:
        return result
    lora = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))) * self.scaling
    return result + lora.to(result.dtype)


SPEED_CHANGES = ["cpu_sdpa", "lora_forward", "padding_mask", "frozen_bf16", "fast_dropout"]


def _ablate(module: Any, ablate: list[str]) -> None:
    """Undo speed changes for a before/after comparison: ``cpu_sdpa`` (attention back to transformers'
    sdpa in the compute dtype), ``lora_forward`` (LoRALinear's forward as it was before),
    ``padding_mask`` (keep the attention mask of right-padded batches), ``frozen_bf16`` (leave the frozen
    linear weights in fp32 under bf16-mixed, autocast casting them at every use), ``fast_dropout``
    (torch's own CPU dropout masks in LoRA and the prefix methods; nothing to undo without dropout)."""
    if "fast_dropout" in ablate:
        from torch import nn

        from litpeft.methods.base import Dropout

        Dropout.forward = nn.Dropout.forward
    if "frozen_bf16" in ablate:
        import litpeft.module

        litpeft.module.store_frozen_linears = lambda model, dtype: 0
    if "lora_forward" in ablate:
        from litpeft.methods.lora import LoRALinear

        LoRALinear.forward = _lora_forward_before
    if "padding_mask" in ablate:
        module.drop_padding_mask = False
    if "cpu_sdpa" in ablate:
        original = module.configure_model

        def configure_model() -> None:
            original()
            if module.model.config._attn_implementation == "litpeft_cpu_sdpa":
                module.model.set_attn_implementation("sdpa")

        module.configure_model = configure_model


def _compile_litpeft(module: Any, cfg: dict[str, Any]) -> None:
    """Compile the decoder (not the head: its input shape changes every step) after configure_model."""
    import torch

    original = module.configure_model

    def configure_model() -> None:
        original()
        t0 = time.perf_counter()
        module.model.model.compile(dynamic=True)
        cfg["compile_setup_s"] = time.perf_counter() - t0

    module.configure_model = configure_model
    torch._dynamo.config.cache_size_limit = 64


def _peft_model(cfg: dict[str, Any]) -> Any:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from litpeft.models import resolve_spec

    torch.manual_seed(SEED)
    if cfg["model"].startswith("tiny:"):  # for trying the script out quickly
        from litpeft.models import load_model

        model = load_model(cfg["model"])
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_spec(model_spec(cfg["model"])), dtype=torch.float32, local_files_only=True
        )
    kind, kwargs = METHODS[cfg["method"]]["peft"]
    model = peft.get_peft_model(model, getattr(peft, kind)(task_type="CAUSAL_LM", **kwargs))
    if cfg["precision"] == "bf16-true":
        model = model.to(torch.bfloat16)
    model.train()
    return model


def run_peft(cfg: dict[str, Any], timer: StepTimer) -> dict[str, Any]:
    """transformers + peft in the plain loop a user writes: full-logits loss from the model itself."""
    import torch

    data = batches(model_spec(cfg["model"]), cfg["data"], cfg["warmup"] + cfg["steps"])
    timer.rss_before = rss_mb()
    model = _peft_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if cfg["precision"] == "bf16-mixed"
        else contextlib.nullcontext()
    )
    for batch in data:
        timer.start(batch)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.stop()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model, "n_trainable": n, "head": "all"}


def run_trainer(cfg: dict[str, Any], timer: StepTimer) -> dict[str, Any]:
    """transformers' Trainer with the same model, batches (same order) and optimizer settings."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = batches(model_spec(cfg["model"]), cfg["data"], cfg["warmup"] + cfg["steps"])
    rows = [
        {k: v[i][: int(b["attention_mask"][i].sum())] for k, v in b.items()}
        for b in data
        for i in range(b["input_ids"].shape[0])
    ]
    order: list[dict[str, Any]] = []

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = data[len(order)]  # the very batch litpeft sees (same padding)
        order.append(batch)
        return batch

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:
            timer.start(order[state.global_step])

        def on_step_end(self, args, state, control, **kwargs) -> None:
            timer.stop()

    class FixedOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    timer.rss_before = rss_mb()
    model = _peft_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=cfg["warmup"] + cfg["steps"],
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LR,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,
            optim="adamw_torch",
            bf16=cfg["precision"] == "bf16-mixed",
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=SEED,
        )
        trainer = FixedOrder(
            model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Timing()]
        )
        trainer.train()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model, "n_trainable": n, "head": "all"}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    timer = StepTimer()
    timer.rss_before = float("nan")
    t0 = time.perf_counter()
    run = {"litpeft": run_litpeft, "peft": run_peft, "trainer": run_trainer}[cfg["runner"]]
    out = run(cfg, timer)
    total_s = time.perf_counter() - t0
    w = cfg["warmup"]
    times, tokens, loss_tokens = timer.times[w:], timer.tokens[w:], timer.loss_tokens[w:]
    if len(times) != cfg["steps"]:
        raise RuntimeError(f"measured {len(times)} steps, expected {cfg['steps']}")
    virtual = METHODS[cfg["method"]].get("virtual_tokens", 0)
    flops = 0.0
    for tok, ltok, pad in zip(tokens, loss_tokens, timer.padded[w:], strict=True):
        t = tok + virtual * BATCH_SIZE
        head = ltok if out["head"] == "loss" else t
        flops += model_flops(
            out["model"], t, pad + virtual, head, METHODS[cfg["method"]].get("virtual_keys", 0)
        )
    secs = sum(times)
    return {
        **{k: v for k, v in cfg.items() if k != "threads"},
        "step_s_median": statistics.median(times),
        "step_s": times,
        "warmup_step_s": timer.times[:w],
        "cpu_s_median": statistics.median(timer.cpu[w:]),
        "tokens_per_s": sum(tokens) / secs,
        "loss_tokens_per_s": sum(loss_tokens) / secs,
        "tokens_per_step": statistics.mean(tokens),
        "loss_tokens_per_step": statistics.mean(loss_tokens),
        "token_counts": tokens,
        "model_flops_per_s": flops / secs,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": timer.rss_before,
        "n_trainable": out["n_trainable"],
        "wall_s": total_s,
        "threads": torch.get_num_threads(),
    }


def matmul_peak(dtype_name: str, seconds: float = 1.0) -> float:
    """Best matmul FLOP/s over a few square and model-like shapes, in ``dtype_name``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best = 0.0
    for m, k, n in [(1024, 1024, 1024), (2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576)]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


# -- profile ------------------------------------------------------------------------------------------
def profile(precision: str, steps: int, out: Path, threads: int = 0) -> None:
    """torch.profiler over litpeft LoRA training steps on SmolLM2-135M (after one warm-up step)."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from litpeft.methods import method_from_config
    from litpeft.module import PeftLM

    torch.manual_seed(SEED)
    torch.set_num_threads(threads or torch.get_num_threads())
    module = PeftLM(model=SMOLLM2, method=method_from_config(METHODS["lora"]["litpeft"]))
    module.configure_model()
    if precision == "bf16-true":
        module.to(torch.bfloat16)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=LR, weight_decay=0.0)
    data = batches(SMOLLM2, "demo", steps + 1)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )

    def step(batch: dict[str, Any]) -> None:
        with record_function("forward+loss"), autocast:
            loss = module.loss_and_accuracy(module.without_padding_mask(batch))[0]
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(data[0])
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in data[1:]:
            step(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{precision}.txt").write_text(table)
    print(table)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))


# -- driver ------------------------------------------------------------------------------------------
def spawn(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**cfg, "error": tail[0][:200], "wall_s": time.perf_counter() - t0}
    return json.loads(lines[-1][len("BENCH_RESULT ") :])


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "lightning"):
        with contextlib.suppress(Exception):
            out[name] = importlib.import_module(name).__version__
    return out


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations, in the order they run: litpeft and peft alternate within each group."""
    base = {
        "steps": args.steps,
        "warmup": args.warmup,
        "data": "demo",
        "model": args.model,
        "threads": args.threads,
    }
    runners = ["litpeft", "peft"] + (["trainer"] if args.trainer else [])
    cfgs: list[dict[str, Any]] = []
    for i, precision in enumerate(args.precisions):
        for repeat in range(args.repeats if i == 0 else 1):
            for runner in runners if repeat == 0 and i == 0 else ["litpeft", "peft"]:
                cfgs.append(
                    {
                        **base,
                        "runner": runner,
                        "method": "lora",
                        "precision": precision,
                        "repeat": repeat,
                        "table": "main",
                    }
                )
            if i == 0 and args.ablation:  # litpeft without its speed changes, right after the pair
                # all of them in every repeat; each one alone in the first
                # (fast_dropout alone is left out: the LoRA here has no dropout; see scripts/ab_speed.py)
                alone = [[c] for c in SPEED_CHANGES if c != "fast_dropout"] if repeat == 0 else []
                for ablate in [SPEED_CHANGES, *alone]:
                    cfgs.append(
                        {
                            **base,
                            "runner": "litpeft",
                            "method": "lora",
                            "precision": precision,
                            "ablate": ablate,
                            "repeat": repeat,
                            "table": "ablation",
                        }
                    )
    for precision in ["bf16-true"] + (["nf4"] if _has_quantize() else []):
        for runner in ["litpeft", "peft"]:
            if precision == "nf4" and runner == "peft":
                continue  # bitsandbytes' 4-bit path is for GPUs
            p = "bf16-true" if precision == "nf4" else precision
            cfgs.append(
                {
                    **base,
                    "runner": runner,
                    "method": "lora",
                    "precision": p,
                    "repeat": 0,
                    "table": "precision",
                    **({"quantize": "nf4"} if precision == "nf4" else {}),
                }
            )
    for name in METHODS:
        if name == "lora":
            continue
        why = method_available(name)
        for runner in ["litpeft", "peft"]:
            if runner == "peft" and METHODS[name]["peft"] is None:
                continue
            cfg = {
                **base,
                "runner": runner,
                "method": name,
                "precision": "bf16-mixed",
                "repeat": 0,
                "table": "methods",
            }
            if why:
                cfg["error"] = why if runner == "litpeft" else "not run: litpeft has no counterpart here"
            cfgs.append(cfg)
    shapes = ([{"data": "long", "steps": max(2, args.steps // 3)}] if args.long else []) + (
        [{"model": "llama-0.5b", "steps": max(2, args.steps // 4)}] if args.large else []
    )
    for shape in shapes:
        for runner in ["litpeft", "peft"]:
            cfgs.append(
                {
                    **base,
                    "runner": runner,
                    "method": "lora",
                    "precision": "bf16-mixed",
                    "warmup": 1,
                    "repeat": 0,
                    "table": "shapes",
                    **shape,
                }
            )
    if args.compile:
        cfgs.append(
            {
                **base,
                "runner": "litpeft",
                "method": "lora",
                "precision": "bf16-mixed",
                "compile": True,
                "repeat": 0,
                "table": "compile",
            }
        )
    return cfgs


def _has_quantize() -> bool:
    from litpeft.module import PeftLM

    return "quantize" in inspect.signature(PeftLM.__init__).parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    parser.add_argument(
        "--repeats", type=int, default=2, help="litpeft/peft pairs (and ablation rows) in the first precision"
    )
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"])
    parser.add_argument(
        "--model", default=SMOLLM2, help="base model of the main tables (tiny:llama to try the script)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--no-trainer", dest="trainer", action="store_false", help="skip transformers' Trainer"
    )
    parser.add_argument("--no-large", dest="large", action="store_false", help="skip the 0.5B random Llama")
    parser.add_argument(
        "--long", action="store_true", help="also the long-sample variant (8 rows per sample)"
    )
    parser.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="skip litpeft without its speed changes"
    )
    parser.add_argument("--compile", action="store_true", help="also litpeft with torch.compile")
    parser.add_argument(
        "--only", nargs="*", default=None, help="tables to run: main precision methods shapes compile"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs", help="where benchmark.md/.svg/.png/.json go"
    )
    parser.add_argument("--profile", action="store_true", help="profile litpeft LoRA steps and exit")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite benchmark.md/.svg/.png from <out>/benchmark.json"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(json.loads(args.worker))
        print("BENCH_RESULT " + json.dumps(result))
        return
    if args.report_only:
        saved = json.loads((args.out / "benchmark.json").read_text())
        write_report(saved["meta"], saved["results"], args.out)
        print(f"wrote {args.out / 'benchmark.md'} from {args.out / 'benchmark.json'}")
        return
    if args.profile:
        for precision in args.precisions:
            profile(precision, args.steps, args.out, args.threads)
        return

    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfgs = [c for c in plan(args) if args.only is None or c["table"] in args.only]
    started = dt.datetime.now(dt.timezone.utc)
    loads = [load_average()]
    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    print(
        f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    results = []
    for cfg in cfgs:
        res = cfg if "error" in cfg else spawn(cfg, args.timeout)
        res["load_after"] = load_average()
        if "step_s" in res:
            loads.append(res["load_after"])
        results.append(res)
        print(_summary(res, peaks), flush=True)
    peaks_after = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (dt.datetime.now(dt.timezone.utc) - started).total_seconds() / 60,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": versions(),
        "loads": loads,
        "peaks": peaks,
        "peaks_after": peaks_after,
        # paths by name only: the JSON is committed under docs/ and must not carry a machine's paths
        "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_report(meta, results, args.out)
    print(f"wrote {args.out / 'benchmark.md'}")


def _peak_for(res: dict[str, Any], peaks: dict[str, float]) -> float:
    return peaks["fp32"] if res["precision"] == "32-true" else peaks["bf16"]


def _summary(res: dict[str, Any], peaks: dict[str, float]) -> str:
    name = f"{res['runner']:8s} {res['method']:16s} {res['precision']:10s} {res['model']:22s} {res['data']}"
    name += f" without {'+'.join(res['ablate'])}" if res.get("ablate") else ""
    if "error" in res:
        return f"{name}  {res['error']}"
    mfu = res["model_flops_per_s"] / _peak_for(res, peaks)
    return (
        f"{name}  {res['tokens_per_s']:7.1f} tok/s  {res['loss_tokens_per_s']:6.1f} loss-tok/s  "
        f"median {res['step_s_median']:.2f} s  peak RSS {res['peak_rss_mb']:.0f} MiB  MFU {100 * mfu:.1f}%  "
        f"(load {res['load_after']})"
    )


# -- report ------------------------------------------------------------------------------------------
RUNNER_NAMES = {
    "litpeft": "litpeft (Lightning)",
    "peft": "transformers + peft, plain loop",
    "trainer": "transformers + peft, HF Trainer",
}


def _row(res: dict[str, Any], peaks: dict[str, float]) -> list[str]:
    label = RUNNER_NAMES[res["runner"]] + (" + torch.compile" if res.get("compile") else "")
    label += " [nf4]" if res.get("quantize") else ""
    label += f" (run {res['repeat'] + 1})" if res.get("repeat") else ""
    label += f" without {' + '.join(res['ablate'])}" if res.get("ablate") else ""
    head = [
        res["method"],
        label,
        res["precision"],
        res["model"] + ("" if res["data"] == "demo" else f" ({res['data']})"),
    ]
    if "error" in res:
        return head + [res["error"], "", "", "", "", "", ""]
    mfu = res["model_flops_per_s"] / _peak_for(res, peaks)
    return head + [
        f"{res['tokens_per_s']:.0f}",
        f"{res['loss_tokens_per_s']:.1f}",
        f"{res['step_s_median']:.2f}",
        f"{res['cpu_s_median']:.2f}",
        f"{res['peak_rss_mb']:.0f}",
        f"{100 * mfu:.1f}%",
        res.get("load_after", ""),
    ]


def _table(rows: list[list[str]]) -> str:
    header = [
        "method",
        "framework",
        "precision",
        "model (data)",
        "tokens/s",
        "loss tokens/s",
        "median step (s)",
        "median CPU s/step",
        "peak RSS (MiB)",
        "MFU",
        "load avg after",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pairs(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(litpeft, peft) results of the same configuration, matched in run order."""
    out = []
    keys = ("method", "precision", "model", "data", "repeat", "table")
    for lit in results:
        if (
            lit["runner"] != "litpeft"
            or "error" in lit
            or lit.get("compile")
            or lit.get("quantize")
            or lit.get("ablate")
        ):
            continue
        for other in results:
            if other["runner"] == "peft" and "error" not in other and all(other[k] == lit[k] for k in keys):
                out.append((lit, other))
                break
    return out


NOTES_MARK = "<!-- notes below are kept when scripts/benchmark.py rewrites this page -->"


def write_report(meta: dict[str, Any], results: list[dict[str, Any]], out: Path) -> None:
    peaks = meta["peaks"]
    v = meta["versions"]
    lines = [
        "# Benchmark: litpeft vs transformers + peft",
        "",
        "Generated by `scripts/benchmark.py` (rerun it to refresh this page; it rewrites it).",
        "",
        f"- date: {meta['date']}, {meta['minutes']:.1f} minutes",
        f"- machine: {meta['machine']}",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in v),
        f"- load average (1/5/15 min): {meta['loads'][0]} at the start, {meta['loads'][-1]} at the end; "
        f"1-minute load after each configuration between {min(float(x.split()[0]) for x in meta['loads']):.2f} "
        f"and {max(float(x.split()[0]) for x in meta['loads']):.2f} (per row in the tables)",
        f"- matmul peak measured by the script: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{peaks['bf16'] / 1e9:.0f} GFLOP/s at the start; fp32 {meta['peaks_after']['fp32'] / 1e9:.0f}, "
        f"bf16 {meta['peaks_after']['bf16'] / 1e9:.0f} at the end",
        f"- work: LoRA r=16, alpha 32, no dropout (lora_dropout: 0.05), all linear layers; AdamW lr 2e-4, no weight decay; "
        f"batch {BATCH_SIZE}; {meta['args']['warmup']} warm-up steps then {meta['args']['steps']} measured "
        f"steps (fewer on the larger shapes, see the JSON); the same batches in the same order on every side",
        "",
        "## litpeft / peft, tokens per second",
        "",
    ]
    write_svg(results, out / "benchmark.svg")
    write_png(results, out / "benchmark.png")
    if (out / "benchmark.png").is_file():
        lines += ["![litpeft vs transformers + peft, tokens/s](benchmark.png)", ""]
    for lit, other in _pairs(results):
        r = lit["tokens_per_s"] / other["tokens_per_s"]
        m = lit["peak_rss_mb"] / other["peak_rss_mb"]
        lines.append(
            f"- {lit['method']} {lit['precision']} {lit['model']} ({lit['data']}, pair {lit['repeat'] + 1}): "
            f"**{r:.2f}x** tokens/s, peak RSS {m:.2f}x"
        )
    for res in results:
        if res["table"] != "ablation" or "error" in res:
            continue
        after = [
            r
            for r in results
            if r["table"] == "main"
            and r["runner"] == "litpeft"
            and r["repeat"] == res["repeat"]
            and r["precision"] == res["precision"]
            and "error" not in r
        ]
        if after:
            which = "all" if res["ablate"] == SPEED_CHANGES else " + ".join(res["ablate"])
            lines.append(
                f"- litpeft's speed changes ({which}), {res['precision']} run {res['repeat'] + 1}: "
                f"**{after[0]['tokens_per_s'] / res['tokens_per_s']:.2f}x** tokens/s over litpeft without "
                f"them, peak RSS {after[0]['peak_rss_mb'] / res['peak_rss_mb']:.2f}x"
            )
    for res in results:
        if res["runner"] == "litpeft" and res["table"] == "methods" and "error" in res:
            lines.append(f"- {res['method']}: {res['error']}")
    sections = [
        ("LoRA on SmolLM2-135M-Instruct, demo data", "main"),
        ("Precision (LoRA; 32-true and bf16-mixed rows repeated from above)", "precision"),
        ("litpeft without its speed changes (LoRA, bf16-mixed): before/after", "ablation"),
        ("Other methods (bf16-mixed)", "methods"),
        ("Larger shapes (LoRA, bf16-mixed)", "shapes"),
        ("torch.compile", "compile"),
    ]
    for title, key in sections:
        chosen = [r for r in results if r["table"] == key]
        if key == "precision" and chosen:
            chosen = [r for r in results if r["table"] == "main" and r["repeat"] == 0] + chosen
        if key == "ablation" and chosen:
            chosen = [
                r
                for r in results
                if r["table"] == "main" and r["runner"] == "litpeft" and r["precision"] == "bf16-mixed"
            ] + chosen
        rows = [_row(r, peaks) for r in chosen]
        if rows:
            lines += ["", f"## {title}", "", _table(rows)]
    lines += [
        "",
        "## Definitions",
        "",
        "- tokens/s: real (non-padding) tokens of the measured steps over their summed wall time; "
        "loss tokens/s: the tokens whose next-token loss is computed (the responses).",
        "- median CPU s/step: CPU time of the worker process per step (all its threads); less sensitive to "
        "other processes on the machine than wall time, so a check on the wall-time figures under load.",
        "- peak RSS: `VmHWM` of the process that ran the configuration (each runs in a fresh process: "
        "imports, model, data and training together).",
        "- MFU: model FLOPs per second over the measured matmul peak in the compute dtype (fp32 for "
        "32-true, bf16 otherwise). Per step, over `t` real tokens, `N` linear weights except the LM head "
        "(LoRA's included), `n` trainable ones, `L` layers, `d` attention width, `T` padded length, "
        "hidden size `h`, vocabulary `V`: forward `2Nt + 4LdTt + 2hV t_head`, backward "
        "`2Nt + 8LdTt + 2hV t_head + 2nt` (a frozen base needs activation gradients only). `t_head` is "
        "the loss positions for litpeft (its LM head runs only there) and every real position for "
        "transformers + peft. The FLOPs are those each implementation does, so peft's work on "
        "positions without loss counts as work.",
    ]
    page = out / "benchmark.md"
    notes = ""
    if page.is_file() and NOTES_MARK in page.read_text():
        notes = page.read_text().split(NOTES_MARK, 1)[1]
    page.write_text("\n".join(lines) + "\n\n" + NOTES_MARK + notes)


def write_png(results: list[dict[str, Any]], path: Path) -> None:
    """litpeft against transformers + peft, tokens/s per configuration (needs matplotlib: ``litpeft[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no benchmark.png (the .svg is written)")
        return
    pairs = _pairs(results)
    if not pairs:
        return
    labels = [
        f"{lit['method']} {lit['precision']} {lit['model'].split('-')[0]} {lit['data']}"
        + (f" #{lit['repeat'] + 1}" if lit["repeat"] else "")
        for lit, _ in pairs
    ]
    y = range(len(pairs))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(pairs) + 1.4))
    ax.barh(
        [i - 0.2 for i in y], [lit["tokens_per_s"] for lit, _ in pairs], 0.4, label="litpeft", color="#792ee5"
    )
    ax.barh(
        [i + 0.2 for i in y],
        [o["tokens_per_s"] for _, o in pairs],
        0.4,
        label="transformers + peft",
        color="#ff9d00",
    )
    for i, (lit, other) in enumerate(pairs):
        ax.text(
            lit["tokens_per_s"] + 3,
            i - 0.2,
            f"{lit['tokens_per_s'] / other['tokens_per_s']:.2f}x",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s (real tokens), higher is better")
    ax.set_title("litpeft vs transformers + peft (ratio at litpeft's bar)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_svg(results: list[dict[str, Any]], path: Path) -> None:
    """A horizontal bar chart of tokens/s per configuration (plain SVG: no plotting library needed)."""
    rows = [
        r for r in results if "error" not in r and r["table"] in ("main", "precision", "shapes", "compile")
    ]
    if not rows:
        return
    colors = {"litpeft": "#792ee5", "peft": "#ff9d00", "trainer": "#999999"}
    bar_h, gap, left, width = 18, 6, 360, 420
    top = 40
    height = top + len(rows) * (bar_h + gap) + 30
    vmax = max(r["tokens_per_s"] for r in rows)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="10" y="20" font-size="14" font-weight="bold">Training tokens/s (real tokens), '
        "litpeft vs transformers + peft</text>",
    ]
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        label = f"{r['runner']} {r['method']} {r['precision']} {r['model'].split('-')[0]} {r['data']}"
        label += " compile" if r.get("compile") else ""
        w = width * r["tokens_per_s"] / vmax
        parts += [
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{label}</text>',
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors[r["runner"]]}"/>',
            f'<text x="{left + w + 4:.1f}" y="{y + 13}">{r["tokens_per_s"]:.0f}</text>',
        ]
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
