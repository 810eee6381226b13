#!/usr/bin/env python3
"""Learning quality, side by side: each method's shipped config trained on the bundled demo task
(date normalization, ``make demo``'s) by litpeft and, where peft has the method, by peft on the same
batches, steps, LR schedule, clipping and precision; held-out greedy exact match and wall time of both.

    python scripts/quality.py                       # every method, 150 steps: docs/quality.md + .json
    python scripts/quality.py --methods lora,p_tuning_v2 --steps 40 --limit 30   # a quick look
    python scripts/quality.py --report-only         # rewrite the page from the JSON

- litpeft: ``PeftLM`` with the method, optimizer and scheduler of ``configs/<method>.yaml``, trained by
  Lightning's ``Trainer.fit`` (the real fit path; the CLI only parses the same YAML into these objects).
- peft: ``get_peft_model`` with peft's counterpart of that config, in the plain PyTorch loop a user
  writes (scripts/bench/run_peft.py's model; the model's own full-logits loss), with the same AdamW,
  warmup-cosine LR, gradient clipping and bf16 autocast.
- Both: the first ``--steps`` batches of litpeft's data module (batch 8, seed 42), and exact match measured
  as ``make demo`` does (:class:`litpeft.evaluation.ExactMatchEvaluation`: greedy, 12 new tokens, batches
  of 50 in validation order) on the 100 held-out rows.

Each (side, method) runs in its own process, one at a time, and the sides alternate per method so both see
the same machine load. Results accumulate in the JSON (a rerun of a method replaces its rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.config import REPO, SEED, SMOLLM2  # noqa: E402
from bench.peft_counterparts import peft_counterpart  # noqa: E402
from quality_report import readme_table, write_readme_table, write_report  # noqa: E402

#: method -> (shipped config, overrides of its method init_args)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "dora": ("lora", {"use_dora": True}),
    "prompt_tuning": ("prompt_tuning", {}),
    "p_tuning": ("p_tuning", {}),
    "prefix_tuning": ("prefix_tuning", {}),
    "p_tuning_v2": ("p_tuning_v2", {}),
    "llama_adapter": ("llama_adapter", {}),
    "llama_adapter_v2": ("llama_adapter_v2", {}),
    "houlsby": ("adapter", {}),
    "ia3": ("ia3", {}),
    "ln_tuning": ("ln_tuning", {}),
    "bitfit": ("bitfit", {}),
    "vera": ("vera", {}),
    "loha": ("loha", {}),
    "lokr": ("lokr", {}),
    "adalora": ("adalora", {}),
    "oft": ("oft", {}),
}
DEFAULT_OUT = REPO / "docs" / "quality.md"
#: prompts per generation batch for exact match (make demo's figure keeps one batching)
EVAL_BATCH = 50
#: the training budget the shipped configs' step schedules are written for (the issue's 150 steps)
SCHEDULE_STEPS = 150


def shipped(method: str, steps: int | None = None) -> dict[str, Any]:
    """``{method, optimizer, lr_scheduler, trainer}`` of the method's shipped config (+ its overrides).

    AdaLoRA's step schedule (tinit, tfinal, delta_t) is written for the demo's budget of
    :data:`SCHEDULE_STEPS` steps; a run of ``steps`` fewer than tinit + tfinal scales it by
    ``steps / SCHEDULE_STEPS`` (both sides get the scaled one, and the JSON records it).
    """
    import yaml

    name, overrides = METHODS[method]
    cfg = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    m = cfg["model"]["init_args"]["method"]
    m = {"class_path": m["class_path"], "init_args": {**m.get("init_args", {}), **overrides}}
    args = m["init_args"]
    if steps is not None and "tfinal" in args and args["tinit"] + args["tfinal"] >= steps:
        for key in ("tinit", "tfinal", "delta_t"):
            args[key] = max(1, round(args[key] * steps / SCHEDULE_STEPS))
    return {
        "config": f"configs/{name}.yaml",
        "method": m,
        "optimizer": cfg["optimizer"],
        "lr_scheduler": cfg.get("lr_scheduler"),
        "precision": cfg["trainer"].get("precision", "32-true"),
        "gradient_clip_val": cfg["trainer"].get("gradient_clip_val"),
    }


def in_peft() -> set[str]:
    """The methods whose shipped config peft has a counterpart of."""
    return {m for m in METHODS if peft_counterpart(m, shipped(m)["method"]["init_args"]) is not None}


# -- one (side, method) in its own process -----------------------------------------------------------
def exact_match_of(
    model: Any, tokenizer: Any, dm: Any, limit: int | None, batch_size: int = EVAL_BATCH
) -> float:
    """``make demo``'s figure: :class:`ExactMatchEvaluation` on ``model`` (bf16 autocast, as in training)."""
    from types import SimpleNamespace

    import torch

    from litpeft.evaluation import ExactMatchEvaluation

    evaluation = ExactMatchEvaluation(limit=limit, max_new_tokens=12, batch_size=batch_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return evaluation._evaluate(
            SimpleNamespace(datamodule=dm), SimpleNamespace(model=model, tokenizer=tokenizer)
        )


def run_litpeft(
    method: str, steps: int, limit: int | None, cfg: dict[str, Any], seed: int = SEED
) -> dict[str, Any]:
    import tempfile

    import lightning as L
    from bench.data import datamodule

    from litpeft.methods import method_from_config
    from litpeft.module import PeftLM

    times: dict[str, float] = {}
    losses: list[float] = []

    class Clock(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
            times["train_start"] = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int
        ) -> None:
            losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
            times["train_end"] = time.perf_counter()

    L.seed_everything(seed, verbose=False)
    dm = datamodule(SMOLLM2, "demo")
    with tempfile.TemporaryDirectory() as tmp:
        module = PeftLM(model=SMOLLM2, method=method_from_config(cfg["method"]), adapter_dir=tmp)
        module.optimizer_init = cfg["optimizer"]
        module.lr_scheduler_init = cfg["lr_scheduler"]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=cfg["precision"],
            max_steps=steps,
            gradient_clip_val=cfg["gradient_clip_val"],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[Clock()],
        )
        trainer.fit(module, datamodule=dm)
        t0 = time.perf_counter()
        em = exact_match_of(module.model, module.tokenizer, dm, limit)
        n = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    return {
        "exact_match": em,
        "train_s": times["train_end"] - times["train_start"],
        "eval_s": time.perf_counter() - t0,
        "losses": losses,
        "n_trainable": n,
    }


def run_peft(
    method: str, steps: int, limit: int | None, cfg: dict[str, Any], seed: int = SEED
) -> dict[str, Any]:
    import torch
    from bench.data import datamodule
    from bench.run_peft import peft_model
    from lightning.pytorch.cli import instantiate_class

    from litpeft.schedulers import build_lr_scheduler

    counterpart = peft_counterpart(method, cfg["method"]["init_args"])
    assert counterpart is not None
    if method == "adalora" and cfg["method"]["init_args"]["total_step"] is None:
        counterpart[1]["total_step"] = steps  # litpeft's null: the trainer's number of steps
    dm = datamodule(SMOLLM2, "demo")
    data = []
    for batch in dm.train_dataloader():
        data.append(batch)
        if len(data) == steps:
            break
    model = peft_model({"model": SMOLLM2, "method": method, "precision": cfg["precision"]}, counterpart, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = instantiate_class(params, cfg["optimizer"])
    sched = build_lr_scheduler(opt, cfg["lr_scheduler"], _Steps(steps)) if cfg["lr_scheduler"] else None
    losses = []
    t0 = time.perf_counter()
    for step, batch in enumerate(data, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16-mixed"):
            loss = model(**batch).loss
        loss.backward()
        if cfg["gradient_clip_val"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["gradient_clip_val"])
        opt.step()
        if sched is not None:
            sched.step()
        if method == "adalora":  # after the step, before zero_grad (peft's order); steps count from 1
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    em = exact_match_of(model, dm.tokenizer, dm, limit, prepare_peft_generation(model))
    return {
        "exact_match": em,
        "train_s": train_s,
        "eval_s": time.perf_counter() - t0,
        "losses": losses,
        "n_trainable": sum(p.numel() for p in params),
        # the model's spec, not this machine's cache path, goes into the JSON
        "peft_config": {
            "class": counterpart[0],
            **{k: SMOLLM2 if k == "tokenizer_name_or_path" else v for k, v in counterpart[1].items()},
        },
    }


def prepare_peft_generation(model: Any) -> int:
    """Set up how peft's side generates and return its batch size: a prompt-learning PeftModel one prompt
    at a time, without the KV cache (set on its generation config).

    With peft 0.21.2 and transformers 5.24, a prompt-learning ``PeftModel``'s answers differ from what its
    own forward (the one it trained with) gives, in two ways (tests/test_quality.py):

    - ``generate`` with the KV cache drops the soft prompt or prefix: it answers as the base model does
      (the 60-step table's peft EM was 0.00 for prompt tuning and P-tuning, 0.20 for the prefix methods);
    - peft ignores the position ids, so in a left-padded batch each row's positions are shifted by its
      padding; a prefix (keys that carry no position of their own) is then read from the wrong distances.

    Without the cache and at batch 1 (no padding), generate equals a greedy loop of peft's forward. Slower,
    and not counted in the train time. Any other PeftModel: the cache and ``EVAL_BATCH``, as litpeft's side.
    """
    if not model.peft_config[model.active_adapter].is_prompt_learning:
        return EVAL_BATCH
    model.base_model.generation_config.use_cache = False
    return 1


class _Steps:
    """What :func:`build_lr_scheduler` reads of a trainer: its number of optimizer steps."""

    def __init__(self, steps: int) -> None:
        self.estimated_stepping_batches = steps
        self.max_steps = steps


def run_base(limit: int | None) -> dict[str, Any]:
    from bench.data import datamodule

    from litpeft.models import load_model

    dm = datamodule(SMOLLM2, "demo")
    t0 = time.perf_counter()
    em = exact_match_of(load_model(SMOLLM2), dm.tokenizer, dm, limit)
    return {"exact_match": em, "eval_s": time.perf_counter() - t0}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if job["side"] == "base":
        out = run_base(job["limit"])
    else:
        cfg = shipped(job["method"], job["steps"])
        run = run_litpeft if job["side"] == "litpeft" else run_peft
        out = run(job["method"], job["steps"], job["limit"], cfg, job.get("seed", SEED))
        out.update(
            config=cfg["config"],
            method_args=cfg["method"]["init_args"],
            lr=cfg["optimizer"]["init_args"]["lr"],
        )
    from quality_report import machine, versions

    finished = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {
        **job,
        **out,
        "total_s": time.perf_counter() - t0,
        "finished": finished,
        "litpeft": versions()["litpeft"],
        "cpu": machine()["cpu"],  # a table can span sittings on machines of the same kind
    }


# -- the driver ----------------------------------------------------------------------------------------
def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` in a fresh process (its last stdout line is the result)."""
    print(f"-- {job['side']} {job.get('method', '')}", flush=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {**job, "error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS)
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out rows only")
    p.add_argument("--sides", default="litpeft,peft", help="litpeft, peft or both")
    p.add_argument("--no-base", action="store_true", help="skip the base model's exact match")
    p.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help=f"seed of the adapters' initial draws (default {SEED}); the batches stay the same",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the page; the JSON goes next to it")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from the JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    data_file = args.out.with_suffix(".json")
    results = json.loads(data_file.read_text())["results"] if data_file.is_file() else []
    if not args.report_only:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = set(methods) - set(METHODS)
        if unknown:
            p.error(f"unknown methods: {', '.join(sorted(unknown))}")
        sides = [s.strip() for s in args.sides.split(",")]
        common = {"steps": args.steps, "limit": args.limit, "seed": args.seed}
        jobs: list[dict[str, Any]] = [] if args.no_base else [{"side": "base", **common}]
        for i, method in enumerate(methods):
            order = sides if i % 2 == 0 else sides[::-1]  # alternate who goes first: same load for both
            for side in order:
                if (
                    side == "peft"
                    and peft_counterpart(method, shipped(method)["method"]["init_args"]) is None
                ):
                    continue
                jobs.append({"side": side, "method": method, **common})
        for job in jobs:
            res = run_job(job)
            key = (res["side"], res.get("method"))
            results = [r for r in results if (r["side"], r.get("method")) != key] + [res]
            print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
            write_report(results, args.out, list(METHODS), in_peft())  # a stopped run keeps its figures
    write_report(results, args.out, list(METHODS), in_peft())
    if args.out == DEFAULT_OUT:  # README.md's copy of the published table
        write_readme_table(readme_table(results, list(METHODS)))
    print(f"wrote {args.out} and {data_file}")


if __name__ == "__main__":
    main()
