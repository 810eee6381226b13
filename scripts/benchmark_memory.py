"""Peak memory and step time of a LoRA step in several precisions and quantizations (not a test).

    python scripts/benchmark_memory.py                                  # ~1.1B Llama, random weights
    python scripts/benchmark_memory.py --model smollm2-135m-instruct --interleave   # bf16-mixed vs fp32

Each mode runs in a fresh process (so peaks do not mix): build the base, apply LoRA (r 16, all linear
layers), then ``--steps`` optimizer steps on random tokens. Reported per mode: peak resident memory while
building, resident memory when training starts (after ``malloc_trim``: the model plus any heap the
allocator could not give back), peak resident memory over the training steps (the high-water mark is
reset after building, ``/proc/self/clear_refs``), parameter bytes, and the median step time after the
first step.

``--interleave`` compares the speed of ``32-true``, ``bf16-mixed`` and ``bf16-true`` in one process,
alternating the step kinds, so that a machine shared with other jobs slows them alike.

Modes: ``fp32`` (32-true), ``bf16-mixed`` (fp32 weights, bf16 autocast), ``bf16`` (bf16-true: bf16 base,
fp32 adapter), ``nf4``/``nf4-dq``/``fp4``/``int8`` (quantized base, bf16 compute, fp32 adapter). On CUDA
the same figures come from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# TinyLlama-1.1B's shape: 1.10B parameters.
LLAMA_1B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
MODES = ["fp32", "bf16-mixed", "bf16", "nf4", "int8"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def run_one(model_spec: str, mode: str, steps: int, batch: int, seq: int, device: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from litpeft.methods import LoRA
    from litpeft.models import load_model
    from litpeft.quantize import quantize_model

    torch.manual_seed(0)
    quantized = mode in ("nf4", "nf4-dq", "fp4", "int8")
    base_dtype = torch.bfloat16 if mode == "bf16" or quantized else torch.float32
    autocast = mode == "bf16-mixed"
    t0 = time.perf_counter()
    if model_spec == "llama-1b":
        cfg = dict(LLAMA_1B)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=base_dtype)
        model.requires_grad_(False)
    else:
        model = load_model(model_spec, dtype=base_dtype)
    model.to(device)
    if quantized:
        quantize_model(model, mode)
    LoRA(r=16, alpha=32).apply(model)  # adapter tensors in fp32 (the default dtype)
    model.train()
    model.config.use_cache = False
    build_s = time.perf_counter() - t0
    gc.collect()
    build_peak = _status_kb("VmHWM")
    _malloc_trim()  # give the allocator's freed build memory back, or it counts in the training peak
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    start_rss = _status_kb("VmRSS")  # what the built model holds (plus heap the allocator kept)
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
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    result = {
        "mode": mode,
        "parameters": sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point),
        "param_bytes_GB": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 3),
        "build_s": round(build_s, 1),
        "build_peak_rss_GB": round(build_peak / 1e6, 2),
        "start_rss_GB": round(start_rss / 1e6, 2),
        "train_peak_rss_GB": round(_status_kb("VmHWM") / 1e6, 2),
        "step_s_median": round(statistics.median(times[1:] if len(times) > 1 else times), 2),
        "step_s_all": [round(t, 2) for t in times],
        "tokens_per_s": round(batch * seq / statistics.median(times[1:] if len(times) > 1 else times), 1),
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
    _malloc_trim()
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
    parser.add_argument("--model", default="llama-1b", help="llama-1b (config-built, random) or a model spec")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    parser.add_argument("--output", help="append the JSON lines to this file")
    parser.add_argument(
        "--interleave", action="store_true", help="32-true vs bf16-mixed vs bf16-true speed, alternating"
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
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.steps, args.batch, args.seq, args.device)))
        return
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
