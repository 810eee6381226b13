"""The fault suite's harness: tiny ``litpeft fit`` runs forked from one warm process (tests/faults/zygote.py),
each with a fault from tests/faults/plug.py, and the checks every scenario shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import word_rows

HERE = Path(__file__).resolve().parent
MAX_STEPS = 12  # trainer.max_steps in tiny.yaml
REPO = HERE.parents[1]

#: every method, with its dropout switched on where it has one (exactness is about the random masks)
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"class_path": "litpeft.methods.LoRA", "init_args": {"r": 4, "dropout": 0.05}},
    "dora": {"class_path": "litpeft.methods.LoRA", "init_args": {"r": 4, "dropout": 0.05, "use_dora": True}},
    "prompt_tuning": {"class_path": "litpeft.methods.PromptTuning", "init_args": {"num_virtual_tokens": 4}},
    "p_tuning": {
        "class_path": "litpeft.methods.PTuning",
        "init_args": {"num_virtual_tokens": 4, "encoder_dropout": 0.1},
    },
    "prefix_tuning": {
        "class_path": "litpeft.methods.PrefixTuning",
        "init_args": {"num_virtual_tokens": 4, "prefix_dropout": 0.1},
    },
    "p_tuning_v2": {
        "class_path": "litpeft.methods.PTuningV2",
        "init_args": {"num_virtual_tokens": 4, "prefix_dropout": 0.1},
    },
    "houlsby": {"class_path": "litpeft.methods.HoulsbyAdapter"},
    "llama_adapter": {"class_path": "litpeft.methods.LlamaAdapter"},
    "llama_adapter_v2": {"class_path": "litpeft.methods.LlamaAdapterV2"},
    "ia3": {"class_path": "litpeft.methods.IA3"},
    "ln_tuning": {"class_path": "litpeft.methods.LNTuning"},
    "bitfit": {"class_path": "litpeft.methods.BitFit", "init_args": {"add_missing_biases": True}},
    "vera": {"class_path": "litpeft.methods.VeRA", "init_args": {"r": 8, "dropout": 0.05}},
    "loha": {
        "class_path": "litpeft.methods.LoHa",
        "init_args": {"r": 2, "rank_dropout": 0.1, "module_dropout": 0.1},
    },
    "lokr": {
        "class_path": "litpeft.methods.LoKr",
        "init_args": {"r": 2, "rank_dropout": 0.1, "module_dropout": 0.1},
    },
    "oft": {
        "class_path": "litpeft.methods.OFT",
        "init_args": {"oft_block_size": 8, "module_dropout": 0.1},
    },
    # the rank budget schedule over the run's 12 steps: its importance EMAs and mask resume too
    "adalora": {
        "class_path": "litpeft.methods.AdaLoRA",
        "init_args": {"init_r": 4, "target_r": 2, "dropout": 0.05},
    },
    "lora_pissa": {
        "class_path": "litpeft.methods.LoRA",
        "init_args": {"r": 4, "dropout": 0.05, "init": "pissa"},
    },
    "lora_olora": {
        "class_path": "litpeft.methods.LoRA",
        "init_args": {"r": 4, "dropout": 0.05, "init": "olora"},
    },
    "loraplus": {"class_path": "litpeft.methods.LoRA", "init_args": {"r": 4, "dropout": 0.05}},
}
#: PeftLM options of a method's run besides the method itself (LoRA+ is an optimizer option)
MODEL_ARGS: dict[str, list[str]] = {"loraplus": ["--model.init_args.loraplus_lr_ratio", "4"]}


class Zygote:
    """Client of tests/faults/zygote.py."""

    def __init__(self, cache: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "LITPEFT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path, fault: dict[str, Any] | None = None) -> int:
        return self._ask({"run": {"argv": argv, "log": str(log), "fault": fault or {}}})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["rc"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(tmp_path_factory.mktemp("litpeft_cache"))
    yield z
    z.close()


class Run:
    """One run directory of the tiny fit, and the commands that train in it."""

    def __init__(self, zygote: Zygote, root: Path, data: Path, method: str = "lora") -> None:
        self.zygote, self.root, self.data, self.method = zygote, root, data, method
        self.n = 0

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def argv(self, resume: bool = False) -> list[str]:
        argv = [
            "fit",
            "--config", str(HERE / "tiny.yaml"),
            "--model.init_args.method", json.dumps(METHODS[self.method]),
            "--model.init_args.adapter_dir", str(self.adapter),
            "--data.init_args.train_file", str(self.data),
            "--trainer.default_root_dir", str(self.root),
            *MODEL_ARGS.get(self.method, []),
        ]  # fmt: skip
        return argv + (["--ckpt_path", "last"] if resume else [])

    def start(self, resume: bool = False, fault: dict[str, Any] | None = None) -> tuple[int, Path]:
        self.n += 1
        log = self.root.parent / f"{self.root.name}.{self.n}.log"
        self.root.mkdir(parents=True, exist_ok=True)
        return self.zygote.start(self.argv(resume), log, fault), log

    def fit(self, resume: bool = False, fault: dict[str, Any] | None = None) -> tuple[int, str]:
        """Exit code (``-9``: killed) and output of one ``litpeft fit``."""
        pid, log = self.start(resume, fault)
        rc = self.zygote.wait(pid)
        return rc, log.read_text()

    def newest_step(self) -> int | None:
        """The highest step of any complete checkpoint anywhere in the run directory (``None``: none)."""
        steps = [checkpoint_step(p) for p in self.root.rglob("*.ckpt")]
        return max((s for s in steps if s is not None), default=None)

    def finish(self) -> str:
        """What a user does after a crash: resume with ``--ckpt_path last`` if a checkpoint is there, else
        start again; the run must continue at the newest checkpoint's step, not retrain from 0."""
        expected = self.newest_step()
        pid, log = self.start(resume=expected is not None)
        rc = self.zygote.wait(pid)
        out = log.read_text()
        assert rc == 0, out[-3000:]
        first = run_info(log)["first_step"]
        assert first == (expected or 0) or (first is None and expected == MAX_STEPS), (first, expected)
        return out


def checkpoint_step(path: Path) -> int | None:
    """The step saved in a checkpoint file, ``None`` if it does not load."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return None


def run_info(log: Path) -> dict[str, Any]:
    """What the plug counted in a run: ``events``, ``first_step`` (its first training step's global_step)."""
    return json.loads(Path(str(log) + ".events").read_text())


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k}: max abs diff {(ta[k] - tb[k]).abs().max().item():.3g}"


def one_error_line(out: str) -> str:
    """The run's only ``litpeft: error:`` line; no traceback anywhere."""
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("litpeft: error:")]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


def fault_rows() -> str:
    """24 rows of a tiny task (reverse a word), as JSONL."""
    return "".join(json.dumps(r) + "\n" for r in word_rows(24))


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fault_data") / "train.jsonl"
    path.write_text(fault_rows())
    return path


@pytest.fixture(scope="session")
def reference(zygote: Zygote, fault_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The uninterrupted run of each method (computed once, on first use): its run dir and event count."""
    done: dict[str, tuple[Run, int]] = {}
    base = tmp_path_factory.mktemp("reference")

    def get(method: str) -> tuple[Run, int]:
        if method not in done:
            run = Run(zygote, base / method, fault_data, method)
            pid, log = run.start()
            rc = zygote.wait(pid)
            assert rc == 0, log.read_text()[-3000:]
            done[method] = (run, run_info(log)["events"])
        return done[method]

    return get
