"""The benchmark's inputs: the demo files (and their long variant), the models, the training batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.config import BATCH_SIZE, LARGE_CONFIG, REPO, SEED, SMOLLM2


def bench_cache() -> Path:
    from litpeft.files import cache_dir

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


def datamodule(spec: str, data: str) -> Any:
    """litpeft's data module over the demo files (``data``: ``demo`` or ``long``), set up for ``fit``."""
    from litpeft.data import InstructionDataModule
    from litpeft.models import load_tokenizer

    train, val = demo_files(data)
    dm = InstructionDataModule(train_file=train, val_file=val, batch_size=BATCH_SIZE, seed=SEED)
    dm.tokenizer = load_tokenizer(spec)
    dm.setup("fit")
    return dm


def batches(spec: str, data: str, steps: int) -> list[dict[str, Any]]:
    """The first ``steps`` training batches exactly as litpeft's data module yields them."""
    dm = datamodule(spec, data)
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == steps:
            return out
    raise SystemExit(f"only {len(out)} batches in the {data} training set")
