"""DDP and FSDP (PeftFSDPStrategy) on 2 CPU processes (gloo) against single-process runs.

One launch of tests/distributed_worker.py trains four runs (see its docstring); the single-process
references run here with the same global batch (4 = 2 ranks x 2). Most runs use equal-length samples;
``ddp_uneven`` and ``ddp_accumulated`` use samples with different numbers of loss tokens, where
PeftLM.weigh_by_tokens makes DDP's gradient average (and gradient accumulation's) equal the single
process's mean over all tokens. litpeft's ResumableSampler hands rank r the samples r, r+2, ... of the
shuffled order: together the ranks see exactly the single process's batches.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from litpeft.distributed import PeftFSDPStrategy, decoder_layers
from litpeft.methods import LoRA
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import METHODS, MODULE_KWARGS, fit  # noqa: E402

# Starts its own processes on fixed world sizes and times collectives: `make test` runs it alone, not on the xdist workers.
pytestmark = pytest.mark.serial

WORKER = Path(__file__).parent / "distributed_worker.py"


def write_equal_length_data(directory: Path) -> None:
    rng = random.Random(0)
    words = ["alpha", "gamma", "delta", "omega", "sigma", "theta", "kappa"]  # all five letters

    def row() -> dict[str, str]:
        return {
            "instruction": "Repeat: " + " ".join(rng.choice(words) for _ in range(3)),
            "output": " ".join(rng.choice(words)[:4] for _ in range(4)),
        }

    directory.mkdir(parents=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(16)))
    (directory / "val.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(4)))


def write_uneven_data(directory: Path) -> None:
    """Answers of 1 to 12 words: the ranks' halves of a batch carry different numbers of loss tokens."""
    rng = random.Random(1)
    words = ["alpha", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    rows = [
        {
            "instruction": "Say some words.",
            "output": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
        }
        for _ in range(20)
    ]
    directory.mkdir(parents=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (directory / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))


def adapter(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(out / name / "adapter" / "adapter.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    write_equal_length_data(out / "data")
    write_uneven_data(out / "uneven")
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    fit(out, "single_lora", "auto", 1, 4, 2)
    fit(out, "single_uneven", "auto", 1, 4, 2, data="uneven")
    fit(out, "single_accumulated", "auto", 1, 2, 2, data="uneven", accumulate=2)
    fit(out, "single_nf4", "auto", 1, 4, 4, "nf4")
    fit(out, "single_int8", "auto", 1, 4, 2, "int8")
    for name in METHODS:
        if name != "lora":
            fit(out, f"single_{name}", "auto", 1, 4, 2, method=name)
    return out


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_same_global_batch(runs: Path) -> None:
    b = adapter(runs, "single_lora")
    assert all(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # trained away from B = 0
    assert_same_adapter(adapter(runs, "ddp"), b, atol=2e-4)  # lr 1e-2: a step moves B by ~1e-2


@pytest.mark.slow
def test_ddp_weighs_every_token_alike_when_ranks_have_different_token_counts(runs: Path) -> None:
    """Each rank's loss is a mean over its own tokens; PeftLM rescales so that DDP's gradient average is
    the mean over all tokens, as in one process (this test fails without it)."""
    assert_same_adapter(adapter(runs, "ddp_uneven"), adapter(runs, "single_uneven"), atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["single_accumulated", "ddp_accumulated", "fsdp_accumulated"])
def test_gradient_accumulation_weighs_every_token_alike(runs: Path, run: str) -> None:
    """Micro-batches of 2 (one process) or of 1 per rank (DDP, FSDP), 2 per optimizer step, with different
    numbers of loss tokens: the same adapter as whole batches of 4, where each token weighs alike (Lightning
    alone would average the micro-batches' means; this test fails without PeftLM's rescaling)."""
    assert_same_adapter(adapter(runs, run), adapter(runs, "single_uneven"), atol=2e-4)


@pytest.mark.slow
def test_qlora_fsdp_with_gradient_checkpointing_equals_one_process(runs: Path) -> None:
    assert_same_adapter(adapter(runs, "fsdp"), adapter(runs, "single_nf4"), atol=2e-4)


@pytest.mark.slow
def test_int8_base_shards_under_fsdp(runs: Path) -> None:
    assert_same_adapter(adapter(runs, "fsdp_int8"), adapter(runs, "single_int8"), atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_every_method_under_fsdp_equals_one_process(runs: Path, method: str) -> None:
    single = adapter(runs, f"single_{method}")
    assert_same_adapter(adapter(runs, f"fsdp_{method}"), single, atol=2e-4)
    L.seed_everything(0)  # the runs' initial adapter: training moved it (else the comparison proves little)
    module = PeftLM("tiny:llama", method=METHODS[method](), **MODULE_KWARGS.get(method, {}))
    module.configure_model()
    initial = module.method.adapter_state_dict(module.model)
    assert initial.keys() == single.keys()
    assert any(not torch.equal(initial[k], single[k]) for k in single)


@pytest.mark.slow
def test_loraplus_under_fsdp_scales_b_learning_rate(runs: Path) -> None:
    """From the same init, AdamW moves each tensor by about its learning rate per step (``m / sqrt(v)`` is
    +-1 at the first step): LoRA+ with ratio 4 leaves B about 4 times LoRA's (B starts at 0), A about alike."""
    plus, lora = adapter(runs, "fsdp_loraplus"), adapter(runs, "single_lora")
    assert plus.keys() == lora.keys()
    for k in plus:
        ratio = (plus[k].abs().max() / lora[k].abs().max()).item()
        low, high = (3, 5) if "lora_B" in k else (0.8, 1.25)
        assert low < ratio < high, (k, ratio)


@pytest.mark.slow
def test_adalora_refuses_fsdp_in_one_line_on_every_rank(runs: Path) -> None:
    errors = [(runs / "fsdp_adalora" / f"error{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1]
    assert "\n" not in errors[0] and "DDP, not FSDP" in errors[0]
    assert not (runs / "fsdp_adalora" / "adapter").exists()


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(runs: Path) -> None:
    assert_same_adapter(adapter(runs, "fsdp_resumed"), adapter(runs, "fsdp"), atol=0)


@pytest.mark.slow
def test_fsdp_checkpoint_holds_the_full_adapter_and_loads_on_one_device(runs: Path) -> None:
    final = adapter(runs, "fsdp")
    ckpt = torch.load(runs / "fsdp" / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False, map_location="cpu")
    state = ckpt["state_dict"]
    assert sorted(state) == sorted("model." + k for k in final)  # trainable tensors only, not shards
    for k, v in final.items():
        torch.testing.assert_close(state["model." + k], v, atol=0, rtol=0)
    # a single-device validate from the FSDP checkpoint restores exactly those tensors
    L.seed_everything(1)  # a different LoRA init: the checkpoint must overwrite it
    module = PeftLM("tiny:llama", method=LoRA(r=4, alpha=8), quantize="nf4")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=1
    )
    from litpeft.data import InstructionDataModule

    data = InstructionDataModule(
        train_file=str(runs / "data" / "train.jsonl"), val_file=str(runs / "data" / "val.jsonl"), batch_size=2
    )
    trainer.validate(module, datamodule=data, ckpt_path=str(runs / "fsdp" / "ckpt" / "epoch=0-step=4.ckpt"))
    loaded = {n[len("model.") :]: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert_same_adapter(loaded, final, atol=0)


def test_decoder_layers_are_found_for_every_tiny_architecture() -> None:
    tok = tiny_tokenizer()
    for arch in ["llama", "qwen2", "gpt2", "mistral", "phi3"]:
        model = load_model(f"tiny:{arch}", tokenizer=tok, meta=True)
        assert len(decoder_layers(model)) == 2, arch
        assert all(p.is_meta for p in model.parameters())


def test_fsdp_strategy_is_a_data_parallel_model_parallel_strategy() -> None:
    strategy = PeftFSDPStrategy()
    assert strategy._tensor_parallel_size == 1
    assert strategy._save_distributed_checkpoint is False


@pytest.mark.parametrize("config", ["qlora", "fsdp", "qlora_fsdp"])
def test_shipped_configs_parse_and_build_their_strategy(config: str) -> None:
    from litpeft.cli import LitPeftCLI

    path = Path(__file__).parents[1] / "configs" / f"{config}.yaml"
    cli = LitPeftCLI(
        args=[
            *("--config", str(path), "--model.init_args.model", "tiny:llama", "--trainer.accelerator", "cpu"),
            *("--data.init_args.train_file", "demo"),  # the shipped configs name no data file
        ],
        run=False,
    )
    assert cli.model.quantize == (None if config == "fsdp" else "nf4")
    assert cli.model.gradient_checkpointing
    assert isinstance(cli.trainer.strategy, PeftFSDPStrategy) == (config != "qlora")
    assert cli.trainer.precision == "bf16-true"
