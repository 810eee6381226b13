"""Peak memory and step time of a LoRA step in several precisions and quantizations (not a test).

    python scripts/benchmark_memory.py --model llama-3.2-3b     # 3.6B Llama, random bf16 weights
    python scripts/benchmark_memory.py --model smollm2-135m-instruct --interleave   # bf16-mixed vs fp32

Shapes ``llama-1b`` (TinyLlama, 1.1B), ``llama-3.2-3b`` (3.6B) and ``llama-3.1-8b`` (8.0B) get random
weights written once as sharded bf16 safetensors under ``<litpeft cache>/benchmark/<shape>`` (as hub
checkpoints are stored) and reused afterwards; any other ``--model`` is a litpeft model spec.

Each mode runs in a fresh process (so peaks do not mix). litpeft's modes build ``PeftLM`` as ``fit``
does (LoRA r 16 on all linear layers): ``fp32`` (32-true), ``bf16-mixed``, ``bf16`` (bf16-true), and
``nf4``/``nf4-dq``/``fp4``/``int8`` (quantized base under bf16-mixed, the default precision).
transformers' own loading for comparison: ``hf-bf16`` (``from_pretrained(dtype=bf16)``), ``hf-nf4`` and
``hf-int8`` (``BitsAndBytesConfig``), with peft's LoRA r 16 on all linear layers for the steps.
After the build every weight is read once (resident, as training will need it). Reported per mode:
peak resident memory (``VmHWM``) and peak anonymous memory (``RssAnon``, sampled every 10 ms: file
pages of a memory-mapped checkpoint are not in it) to build, the same over the ``--steps`` training
steps (high-water marks reset after building), parameter bytes, and the median step time after the
first. On CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litpeft import heap  # noqa: E402

_LLAMA = dict(model_type="llama", max_position_embeddings=2048, rope_theta=500000.0)
SHAPES = {  # the published configs' shapes
    "llama-1b": dict(
        _LLAMA,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    "llama-3.2-3b": dict(
        _LLAMA,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        _LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
MODES = ["fp32", "bf16-mixed", "bf16", "nf4", "int8", "hf-bf16", "hf-nf4", "hf-int8"]
PRECISION = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "bf16": "bf16-true"}  # else bf16-mixed
SHARD_BYTES = 2 * 10**9


def shape_dir(shape: str) -> Path:
    """The shape's random bf16 checkpoint, written once shard by shard (one shard in memory at a time).

    Each weight is drawn straight in bf16 (``normal_``, std 0.02; norms 1), about 150 M values/s on one
    core: the 8B shape's 16 GB take a few minutes, bounded by the disk.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from litpeft.files import atomic_path, cache_dir
    from litpeft.models import tiny_tokenizer

    target = cache_dir() / "benchmark" / shape
    if (target / "config.json").is_file():
        return target
    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), dtype="bfloat16", **cfg)
    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(config).state_dict()
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, t in names.items():  # group the names into shards of about SHARD_BYTES
        if sum(v.numel() * 2 for v in shards[-1].values()) + t.numel() * 2 > SHARD_BYTES and shards[-1]:
            shards.append({})
        shards[-1][name] = t
    g = torch.Generator().manual_seed(0)
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in names.values())}, "weight_map": {}}
    with atomic_path(target, directory=True) as tmp:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, t in shard.items():  # filled in bf16 in place: no fp32 temporary of any weight
                w = torch.empty(t.shape, dtype=torch.bfloat16)
                tensors[name] = (
                    w.fill_(1.0) if name.endswith("norm.weight") else w.normal_(0, 0.02, generator=g)
                )
                index["weight_map"][name] = file
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
            print(f"wrote {file}", file=sys.stderr, flush=True)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
        config.save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
    return target


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """The highest ``RssAnon`` since the last :meth:`reset`, sampled every 10 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(0.01)

    def reset(self) -> int:
        peak, self.peak = max(self.peak, _status_kb("RssAnon")), 0
        return peak


def _build_litpeft(spec: str, mode: str):  # noqa: ANN202
    from lightning.pytorch import Trainer

    from litpeft.methods import LoRA
    from litpeft.module import PeftLM

    quantize = None if mode in PRECISION else mode
    precision = PRECISION.get(mode, "bf16-mixed")
    module = PeftLM(spec, method=LoRA(r=16, alpha=32, target_modules="all-linear"), quantize=quantize)
    module.trainer = Trainer(precision=precision, logger=False, enable_progress_bar=False, devices=1)
    module.configure_model()
    return module.model, precision == "bf16-mixed", lambda: module.on_train_batch_end(None, None, 0)


def _build_hf(path: str, mode: str):  # noqa: ANN202
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {
        "hf-nf4": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "hf-int8": BitsAndBytesConfig(load_in_8bit=True),
    }.get(mode)
    kwargs = {"quantization_config": quant, "device_map": "cpu"} if quant else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model, False, lambda: None


def run_one(model_spec: str, mode: str, steps: int, batch: int, seq: int, device: str) -> dict:
    import torch

    spec = str(shape_dir(model_spec)) if model_spec in SHAPES else model_spec
    anon = AnonPeak()
    Path("/proc/self/clear_refs").write_text("5")
    anon.reset()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, autocast, after_step = (_build_hf if mode.startswith("hf-") else _build_litpeft)(spec, mode)
    model.to(device)
    with torch.no_grad():  # read every weight once: a memory-mapped checkpoint becomes resident
        for p in model.parameters():
            p.sum()
    model.train()
    model.config.use_cache = False
    build_s = time.perf_counter() - t0
    gc.collect()
    build_peak, build_anon = _status_kb("VmHWM"), anon.reset()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    start_rss = _status_kb("VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()  # PeftLM's step-end hook (Lightning calls it in fit)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    median = statistics.median(times[1:] if len(times) > 1 else times)
    result = {
        "mode": mode,
        "parameters": sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point),
        "param_bytes_GB": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 3),
        "build_s": round(build_s, 1),
        "build_peak_rss_GB": round(build_peak / 1e6, 2),
        "build_peak_anon_GB": round(build_anon / 1e6, 2),
        "start_rss_GB": round(start_rss / 1e6, 2),
        "train_peak_rss_GB": round(_status_kb("VmHWM") / 1e6, 2),
        "train_peak_anon_GB": round(anon.reset() / 1e6, 2),
        "step_s_median": round(median, 2),
        "step_s_all": [round(t, 2) for t in times],
        "tokens_per_s": round(batch * seq / median, 1),
        "losses": [round(v, 4) for v in losses],
    }
    if device == "cuda":
        result["cuda_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return result


def interleave(model_spec: str, steps: int, batch: int, seq: int) -> dict:
    """Alternate 32-true, bf16-mixed and bf16-true LoRA steps (fp32 adapters); median time of each."""
    import copy

    import torch

    from litpeft.methods import LoRA
    from litpeft.methods.attention import CPU_SDPA
    from litpeft.models import load_model

    torch.manual_seed(0)
    model = load_model(model_spec, dtype=torch.float32)
    LoRA(r=16, alpha=32).apply(model)
    model.set_attn_implementation(CPU_SDPA)  # as PeftLM: attention in fp32 on the CPU under bf16
    model.train()
    half = copy.deepcopy(model)
    for p in half.parameters():
        if not p.requires_grad:  # bf16-true: the base in bf16, the adapter kept fp32 (as PeftLM does)
            p.data = p.data.bfloat16()
    heap.trim()
    kinds = {"32-true": (model, False), "bf16-mixed": (model, True), "bf16-true": (half, False)}
    opts = {
        id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0) for m in (model, half)
    }
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (batch, seq))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(len(kinds) * (steps + 1)):  # the first round warms up
        kind = list(kinds)[i % len(kinds)]
        m, autocast = kinds[kind]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opts[id(m)].step()
        opts[id(m)].zero_grad(set_to_none=True)
        if i >= len(kinds):
            times[kind].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "interleave": model_spec,
        "tokens_per_step": batch * seq,
        "step_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "speedup_vs_32_true": {k: round(med["32-true"] / v, 2) for k, v in med.items()},
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-1b", help=f"{', '.join(SHAPES)} (random weights) or a spec")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    parser.add_argument("--output", help="append the JSON lines to this file")
    parser.add_argument(
        "--interleave", action="store_true", help="32-true vs bf16-mixed vs bf16-true speed, alternating"
    )
    parser.add_argument(
        "--no-trim", action="store_true", help="without litpeft's malloc_trim calls (litpeft.heap)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args()
    if args.interleave:
        line = json.dumps(interleave(args.model, args.steps, args.batch, args.seq))
        print(line)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")
        return
    if args.no_trim:
        heap.trim = lambda: False
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.steps, args.batch, args.seq, args.device)))
        return
    if args.model in SHAPES:
        shape_dir(args.model)  # written once, before any measurement
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = (
            proc.stdout.strip().splitlines()[-1]
            if proc.returncode == 0
            else json.dumps({"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
        )
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
