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
    python scripts/benchmark.py --only ablation --ablate padding_mask   # litpeft with / without one change

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

A method is one entry of :data:`bench.config.METHODS`: its litpeft config (by registered short name) and,
where peft has it, the peft config. A method this checkout does not have is reported, never skipped
silently.

The ablation rows run litpeft without some of its speed changes (:data:`bench.config.SPEED_CHANGES`, the
switches of :class:`litpeft.speedups.Speedups`): the worker turns those switches off for its process and
litpeft's own code paths read them; nothing is patched or copied.

This file is the driver (options, the plan of configurations, one worker process per configuration,
the results); the rest lives in ``scripts/bench/`` (see its ``__init__``): one module per comparison
(``run_litpeft``, ``run_peft``, ``run_trainer``), the worker, the measurements, the report and plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.config import METHODS, REPO, SMOLLM2, SPEED_CHANGES, method_available
from bench.measure import cpu_name, load_average, matmul_peak, versions
from bench.report import summary, write_report


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
                for ablate in ablations(args.ablate, repeat):
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


def ablations(chosen: list[str] | None, repeat: int) -> list[list[str]]:
    """The speed changes each ablation row of repeat ``repeat`` runs without.

    By default all of them in every repeat, and each one alone in the first (``fast_dropout`` alone is
    left out: the LoRA here has no dropout; see scripts/ab_speed.py). ``--ablate`` names the rows instead,
    in every repeat: a switch alone, or ``all``.
    """
    if chosen is None:
        alone = [[c] for c in SPEED_CHANGES if c != "fast_dropout"] if repeat == 0 else []
        return [SPEED_CHANGES, *alone]
    return [SPEED_CHANGES if name == "all" else [name] for name in chosen]


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
    parser.add_argument(
        "--ablate",
        nargs="+",
        choices=[*SPEED_CHANGES, "all"],
        metavar="NAME",
        help="the ablation rows: litpeft without this speed change (or all), each a row, in every repeat "
        f"(default: all, and each but fast_dropout alone in the first); names: {' '.join(SPEED_CHANGES)}",
    )
    parser.add_argument("--compile", action="store_true", help="also litpeft with torch.compile")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="tables to run: main ablation precision methods shapes compile",
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
        from bench.worker import worker

        result = worker(json.loads(args.worker))
        print("BENCH_RESULT " + json.dumps(result))
        return
    if args.report_only:
        saved = json.loads((args.out / "benchmark.json").read_text())
        write_report(saved["meta"], saved["results"], args.out)
        print(f"wrote {args.out / 'benchmark.md'} from {args.out / 'benchmark.json'}")
        return
    if args.profile:
        from bench.profiling import profile

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
        print(summary(res, peaks), flush=True)
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


if __name__ == "__main__":
    main()
