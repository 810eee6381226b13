"""Helpers of the top-level tests: quick adapter dirs, a two-step LoRA fit, JSONL files, running ``litpeft``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel

from litpeft import PeftLM
from litpeft.adapter_dir import save_adapter
from litpeft.data import InstructionDataModule
from litpeft.data.prompts import get_style
from litpeft.methods import LoRA, PeftMethod
from litpeft.models import load_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_adapter(
    directory: str | Path,
    model: str,
    method: PeftMethod,
    style: str = "alpaca",
    scale: float = 0.3,
    seed: int = 0,
    quantize: str | None = None,
) -> Path:
    """An adapter dir as ``fit`` leaves it, without training: every trainable tensor gets seeded noise,
    so the adapter changes the model's outputs (a zero-init adapter would pass any equality test)."""
    lm = PeftLM(model=model, method=method, quantize=quantize)
    lm.configure_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lm.model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return save_adapter(directory, lm, get_style(style, lm.tokenizer))


def fit_tiny_lora(
    tmp_path: Path, precision: str = "32-true", num_sanity_val_steps: int = 0, **module_kwargs: Any
) -> PeftLM:
    """Two AdamW steps (lr 1e-2, seed 0) of LoRA r=4 on ``tiny:llama`` with a small instruction file on the
    CPU; the adapter is saved to ``tmp_path / "adapter"``. ``module_kwargs`` go to ``PeftLM``."""
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ["alpha", "gamma", "delta", "omega"] * 2]
    write_jsonl(tmp_path / "train.jsonl", rows)
    L.seed_everything(0)
    module = PeftLM("tiny:llama", method=LoRA(r=4), adapter_dir=str(tmp_path / "adapter"), **module_kwargs)
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    data = InstructionDataModule(train_file=str(tmp_path / "train.jsonl"), val_fraction=0.25, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=num_sanity_val_steps,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    return module


def save_other_base(directory: str | Path, arch: str = "llama", dtype: torch.dtype = torch.float32) -> Path:
    """A tiny base of the same architecture as ``tiny:<arch>`` but different weights, as a model dir."""
    tokenizer = tiny_tokenizer()
    model = load_model(f"tiny:{arch}", tokenizer=tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def token_ids(n: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 250, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the real positions (a method that prepends virtual tokens returns more)."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1] :].float()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_litpeft(
    *args: str, stdin: str | None = None, cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m litpeft ARGS`` in a subprocess, as a user runs it (in ``cwd``, by default this one's)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "litpeft", *args],
        input=stdin,
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The ``litpeft: error: ...`` line of a failed run (and check that it is the only error output)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("litpeft: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


class NormTuning(PeftMethod):
    """Test-only method: trains the final norm's scale; declares neither merge nor peft export."""

    name = "test_norm_tuning"

    def inject(self, model: PreTrainedModel) -> None:
        norm = [m for n, m in model.named_modules() if n.endswith(("norm", "ln_f"))][-1]
        norm.weight.requires_grad_(True)


def main_error(capsys: Any, *argv: str) -> str:
    """Run ``litpeft ARGV`` in this process; it must fail with exit code 2 and one error line, returned."""
    import pytest

    from litpeft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("litpeft: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]
