"""The bad-input catalogue: every ordinary mistake a user makes gets one line, a non-zero exit, no traceback,
and leaves the working directory as it was.

Each case runs the real CLI (``python -m litpeft ...``) in a subprocess, in its own empty working directory
(plus the files the case puts there first), with the shared fixtures (a tiny config, data, adapters,
broken models and checkpoints) read from elsewhere. A case asserts: exit status non-zero, exactly one
``litpeft: error:`` line, that line names the offending key or path, no ``Traceback`` anywhere in the
output, and no file created, changed or removed in the working directory or the fixtures. The cases run
two at a time; most are marked ``slow``, a representative slice is not.

The fast slice starts a fresh ``python -m litpeft`` per case. The slow table runs the same ``main()`` in a
child forked from a warm interpreter (tests/cli_zygote.py), which saves each case the seconds of importing
torch and transformers and nothing else: the child has its own working directory, output descriptors and
exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from adapter_helpers import REPO, make_adapter, write_jsonl

from litpeft.methods import HoulsbyAdapter, LoRA, PromptTuning
from litpeft.models import load_model, tiny_tokenizer

FIT = ("fit", "--config", "{fx}/tiny.yaml")


@dataclass(frozen=True)
class Case:
    """``argv`` ({fx}: the fixtures directory) must fail with one line containing ``names``."""

    id: str
    argv: tuple[str, ...]
    names: str
    files: dict[str, str] = field(default_factory=dict)  # put into the working directory first
    fast: bool = False


def fit(*override: str) -> tuple[str, ...]:
    return (*FIT, *override)


def method_arg(key: str, value: str) -> tuple[str, ...]:
    return fit(f"--model.method.init_args.{key}", value)


GEN = ("generate", "--adapter", "{fx}/lora")
PROMPT = ("--prompt", "hi")

CASES = [
    # -- method arguments ----------------------------------------------------------------------------
    Case("lora-r-negative", method_arg("r", "-1"), "model.method.init_args.r: -1", fast=True),
    Case("lora-r-zero", method_arg("r", "0"), "model.method.init_args.r: 0"),
    Case("lora-r-word", method_arg("r", "sixteen"), "model.method.init_args.r: 'sixteen'", fast=True),
    Case("lora-r-float", method_arg("r", "1.5"), "model.method.init_args.r"),
    Case("lora-alpha-zero", method_arg("alpha", "0"), "model.method.init_args.alpha: 0"),
    Case("lora-dropout-above-1", method_arg("dropout", "1.5"), "model.method.init_args.dropout: 1.5"),
    Case("lora-dropout-negative", method_arg("dropout", "-0.1"), "model.method.init_args.dropout"),
    Case("lora-init-unknown", method_arg("init", "xavier"), "model.method.init_args.init: 'xavier'"),
    Case("lora-bias-unknown", method_arg("bias", "some"), "model.method.init_args.bias: 'some'"),
    Case("lora-target-no-layer", method_arg("target_modules", "[nope]"), "target_modules", fast=True),
    Case("lora-target-empty-list", method_arg("target_modules", "[]"), "target_modules"),
    Case("lora-unknown-arg", method_arg("rank", "4"), "rank"),
    Case(
        "method-unknown-class",
        fit("--model.method", "{class_path: NoSuchMethod}"),
        "NoSuchMethod",
        fast=True,
    ),
    Case("method-unknown-short", fit("--model.method.class_path", "lora2"), "lora2"),
    Case(
        "prompt-tuning-zero-tokens",
        fit(
            "--model.method", "{class_path: litpeft.methods.PromptTuning, init_args: {num_virtual_tokens: 0}}"
        ),
        "num_virtual_tokens: 0",
    ),
    Case(
        "adapter-bottleneck-zero",
        fit(
            "--model.method", "{class_path: litpeft.methods.HoulsbyAdapter, init_args: {bottleneck_size: 0}}"
        ),
        "bottleneck_size: 0",
    ),
    # -- optimizer, scheduler, trainer, module ------------------------------------------------------
    Case("lr-negative", fit("--optimizer.init_args.lr", "-1"), "optimizer.init_args.lr: -1", fast=True),
    Case("lr-word", fit("--optimizer.init_args.lr", "fast"), "optimizer.init_args.lr"),
    Case("weight-decay-negative", fit("--optimizer.init_args.weight_decay", "-1"), "weight_decay"),
    Case("optimizer-unknown", fit("--optimizer.class_path", "torch.optim.Nope"), "torch.optim.Nope"),
    Case("warmup-negative", fit("--lr_scheduler.init_args.warmup_steps", "-5"), "warmup_steps: -5"),
    Case("min-lr-ratio-above-1", fit("--lr_scheduler.init_args.min_lr_ratio", "2"), "min_lr_ratio: 2"),
    Case("max-steps-negative", fit("--trainer.max_steps", "-5"), "max_steps"),
    Case("precision-unknown", fit("--trainer.precision", "7"), "precision"),
    Case("accumulate-zero", fit("--trainer.accumulate_grad_batches", "0"), "accumulate_grad_batches"),
    Case("trainer-unknown-key", fit("--trainer.max_stepz", "3"), "max_stepz"),
    Case("quantize-unknown", fit("--model.quantize", "nf5"), "quantize"),
    Case("seed-word", fit("--seed_everything", "abc"), "seed_everything"),
    # -- data ------------------------------------------------------------------------------------------
    Case("data-missing", fit("--data.train_file", "missing.jsonl"), "missing.jsonl"),
    Case("data-garbage", fit("--data.train_file", "{fx}/garbage.bin"), "garbage.bin"),
    Case("data-empty", fit("--data.train_file", "{fx}/empty.jsonl"), "empty.jsonl"),
    Case("data-batch-zero", fit("--data.batch_size", "0"), "batch_size"),
    Case("data-seq-negative", fit("--data.max_seq_length", "-1"), "max_seq_length"),
    Case("data-val-fraction", fit("--data.val_fraction", "1.5"), "val_fraction"),
    Case("data-truncation", fit("--data.truncation", "bogus"), "truncation"),
    Case("data-unknown-key", fit("--data.bach_size", "4"), "bach_size"),
    # -- models -------------------------------------------------------------------------------------
    Case("model-missing-path", fit("--model.model", "./no/such/model"), "./no/such/model"),
    Case(
        "model-truncated-safetensors",
        fit("--model.model", "{fx}/truncated_model"),
        "truncated_model",
        fast=True,
    ),
    Case("model-garbage-gguf", fit("--model.model", "{fx}/garbage.gguf"), "garbage.gguf", fast=True),
    Case("model-missing-gguf", fit("--model.model", "{fx}/missing.gguf"), "missing.gguf"),
    Case("model-no-config", fit("--model.model", "{fx}/no_config_model"), "no_config_model"),
    Case("model-tiny-unknown", fit("--model.model", "tiny:nope"), "tiny:nope"),
    # -- checkpoints --------------------------------------------------------------------------------
    Case("ckpt-missing", fit("--ckpt_path", "missing.ckpt"), "missing.ckpt", fast=True),
    Case("ckpt-garbage", fit("--ckpt_path", "{fx}/garbage.ckpt"), "garbage.ckpt"),
    Case("ckpt-empty", fit("--ckpt_path", "{fx}/empty.ckpt"), "empty.ckpt"),
    Case("ckpt-directory", fit("--ckpt_path", "{fx}"), "--ckpt_path"),
    # -- config files -------------------------------------------------------------------------------
    Case("config-empty", ("fit", "--config", "{fx}/empty.yaml"), "empty.yaml", fast=True),
    Case("config-missing", ("fit", "--config", "nope.yaml"), "nope.yaml"),
    Case("config-not-yaml", ("fit", "--config", "{fx}/broken.yaml"), "broken.yaml"),
    Case("config-a-list", ("fit", "--config", "{fx}/list.yaml"), "list.yaml"),
    # -- output paths of fit ------------------------------------------------------------------------
    Case(
        "fit-root-under-proc", fit("--trainer.default_root_dir", "/proc/litpeft_runs"), "/proc/litpeft_runs"
    ),
    Case(
        "fit-adapter-dir-under-sys",
        fit("--model.adapter_dir", "/sys/litpeft_adapter"),
        "/sys/litpeft_adapter",
    ),
    Case(
        "fit-root-under-a-file",
        fit("--trainer.default_root_dir", "notes.txt/runs"),
        "notes.txt",
        files={"notes.txt": "mine\n"},
    ),
    # -- generate -----------------------------------------------------------------------------------
    Case("gen-adapter-missing", ("generate", "--adapter", "nope", *PROMPT), "nope"),
    Case("gen-adapter-not-adapter", ("generate", "--adapter", "{fx}", *PROMPT), "not a litpeft adapter"),
    Case("gen-adapter-bad-yaml", ("generate", "--adapter", "{fx}/bad_yaml", *PROMPT), "adapter.yaml"),
    Case(
        "gen-adapter-truncated",
        ("generate", "--adapter", "{fx}/truncated_adapter", *PROMPT),
        "adapter.safetensors",
    ),
    Case(
        "gen-adapter-r-negative",
        ("generate", "--adapter", "{fx}/r_negative", *PROMPT),
        "method.init_args.r: -1",
    ),
    Case(
        "gen-adapter-method-unknown",
        ("generate", "--adapter", "{fx}/method_unknown", *PROMPT),
        "NoSuchMethod",
    ),
    Case("gen-model-garbage-gguf", ("generate", "--model", "{fx}/garbage.gguf", *PROMPT), "garbage.gguf"),
    Case(
        "gen-model-truncated",
        ("generate", "--model", "{fx}/truncated_model", *PROMPT),
        "truncated_model",
    ),
    Case("gen-nothing-to-load", ("generate", *PROMPT), "--adapter"),
    Case("gen-input-missing", (*GEN, "--input", "nope.jsonl", "--output", "out.jsonl"), "nope.jsonl"),
    Case("gen-input-garbage", (*GEN, "--input", "{fx}/garbage.bin", "--output", "out.jsonl"), "garbage.bin"),
    Case(
        "gen-output-exists",
        (*GEN, "--input", "{fx}/prompts.jsonl", "--output", "answers.jsonl"),
        "answers.jsonl",
        files={"answers.jsonl": '{"mine": 1}\n'},
        fast=True,
    ),
    Case(
        "gen-output-under-proc",
        (*GEN, "--input", "{fx}/prompts.jsonl", "--output", "/proc/litpeft/answers.jsonl"),
        "/proc/litpeft/answers.jsonl",
    ),
    Case(
        "gen-output-under-sys",
        (*GEN, "--input", "{fx}/prompts.jsonl", "--output", "/sys/answers.jsonl"),
        "/sys/answers.jsonl",
    ),
    Case(
        "gen-output-is-dir",
        (*GEN, "--input", "{fx}/prompts.jsonl", "--output", "{fx}"),
        "--output",
    ),
    Case("gen-temperature-negative", (*GEN, *PROMPT, "--temperature", "-1"), "--temperature"),
    Case("gen-top-p-zero", (*GEN, *PROMPT, "--top_p", "0"), "--top_p"),
    Case("gen-max-new-tokens-zero", (*GEN, *PROMPT, "--max_new_tokens", "0"), "--max_new_tokens"),
    Case("gen-dtype-unknown", (*GEN, *PROMPT, "--dtype", "float7"), "dtype"),
    Case("gen-device-unknown", (*GEN, *PROMPT, "--device", "tpu9"), "--device"),
    Case("gen-unknown-flag", (*GEN, *PROMPT, "--bogus", "1"), "--bogus"),
    # -- evaluate -----------------------------------------------------------------------------------
    Case("eval-data-missing", ("evaluate", "--adapter", "{fx}/lora", "--data", "nope.jsonl"), "nope.jsonl"),
    Case(
        "eval-no-reference",
        ("evaluate", "--adapter", "{fx}/lora", "--data", "{fx}/prompts.jsonl", "--output", "e.json"),
        "prompts.jsonl",
    ),
    Case(
        "eval-batch-zero",
        ("evaluate", "--model", "tiny:llama", "--data", "{fx}/train.jsonl", "--batch_size", "0"),
        "--batch_size",
    ),
    Case(
        "eval-output-under-proc",
        (
            "evaluate",
            "--model",
            "tiny:llama",
            "--data",
            "{fx}/train.jsonl",
            "--output",
            "/proc/litpeft/e.json",
        ),
        "/proc/litpeft/e.json",
    ),
    Case(
        "eval-output-exists",
        ("evaluate", "--model", "tiny:llama", "--data", "{fx}/train.jsonl", "--output", "e.json"),
        "e.json",
        files={"e.json": "{}\n"},
    ),
    # -- merge and export ---------------------------------------------------------------------------
    Case("merge-not-mergeable", ("merge", "--adapter", "{fx}/prompt", "--output", "m"), "prompt tuning"),
    Case(
        "merge-output-not-empty",
        ("merge", "--adapter", "{fx}/lora", "--output", "m"),
        "'m'",
        files={"m/notes.txt": "mine\n"},
    ),
    Case(
        "merge-overwrite-foreign-dir",
        ("merge", "--adapter", "{fx}/lora", "--output", "m", "--overwrite", "true"),
        "notes.txt",
        files={"m/notes.txt": "mine\n", "m/config.json": "{}\n"},
        fast=True,
    ),
    Case(
        "merge-output-under-proc",
        ("merge", "--adapter", "{fx}/lora", "--output", "/proc/litpeft_m"),
        "/proc/litpeft_m",
    ),
    Case(
        "merge-output-a-file", ("merge", "--adapter", "{fx}/lora", "--output", "m"), "'m'", files={"m": "x"}
    ),
    Case(
        "merge-dtype-unknown",
        ("merge", "--adapter", "{fx}/lora", "--output", "m", "--dtype", "int3"),
        "dtype",
    ),
    Case("merge-adapter-missing", ("merge", "--adapter", "nope", "--output", "m"), "nope"),
    Case(
        "export-format-unknown",
        ("export", "--adapter", "{fx}/lora", "--output", "p", "--format", "onnx"),
        "format",
    ),
    Case("export-not-exportable", ("export", "--adapter", "{fx}/houlsby", "--output", "p"), "Houlsby"),
    Case(
        "export-overwrite-foreign-dir",
        ("export", "--adapter", "{fx}/lora", "--output", "p", "--overwrite", "true"),
        "notes.txt",
        files={"p/notes.txt": "mine\n"},
    ),
    Case(
        "export-output-under-sys",
        ("export", "--adapter", "{fx}/lora", "--output", "/sys/litpeft_p"),
        "/sys/litpeft_p",
    ),
    # -- download and the command line --------------------------------------------------------------
    Case("download-not-hub-id", ("download", "./local/dir"), "./local/dir"),
    Case("download-revision-conflict", ("download", "org/name@v1", "--revision", "v2"), "--revision"),
    Case("download-offline", ("download", "org/not-cached"), "org/not-cached"),
    Case("command-unknown", ("fitt",), "fitt"),
]


def _write_fixtures(fx: Path) -> None:
    rows = [
        {"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ["apple", "river"] * 6
    ]
    write_jsonl(fx / "train.jsonl", rows)
    write_jsonl(fx / "prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Say bye."}])
    (fx / "empty.jsonl").write_text("")
    (fx / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    config = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
    config["model"]["init_args"]["model"] = "tiny:llama"
    config["data"]["init_args"].update(train_file=str(fx / "train.jsonl"), batch_size=4, max_seq_length=64)
    config["trainer"].update(
        max_steps=1, precision="32-true", default_root_dir="runs", enable_progress_bar=False
    )
    (fx / "tiny.yaml").write_text(yaml.safe_dump(config))
    (fx / "empty.yaml").write_text("")
    (fx / "broken.yaml").write_text("model: {init_args: [\n")
    (fx / "list.yaml").write_text("- a\n- b\n")
    # models: a truncated safetensors file, a garbage GGUF, a directory without config.json
    tokenizer = tiny_tokenizer()
    load_model("tiny:llama", tokenizer=tokenizer).save_pretrained(fx / "truncated_model")
    tokenizer.save_pretrained(fx / "truncated_model")
    weights = fx / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (fx / "garbage.gguf").write_bytes(b"not a gguf file" * 100)
    (fx / "no_config_model").mkdir()
    (fx / "no_config_model" / "model.safetensors").write_bytes(b"")
    # checkpoints
    (fx / "garbage.ckpt").write_bytes(b"\x80garbage" * 50)
    (fx / "empty.ckpt").write_bytes(b"")
    # adapters: good ones, and broken copies of the LoRA one
    make_adapter(fx / "lora", "tiny:llama", LoRA(r=2), style="chatml")
    make_adapter(fx / "prompt", "tiny:llama", PromptTuning(num_virtual_tokens=2))
    make_adapter(fx / "houlsby", "tiny:llama", HoulsbyAdapter(bottleneck_size=4))
    lora_yaml = (fx / "lora" / "adapter.yaml").read_text()
    lora_weights = (fx / "lora" / "adapter.safetensors").read_bytes()
    meta = yaml.safe_load(lora_yaml)
    broken = {
        "bad_yaml": ("method: {class_path: [\n", lora_weights),
        "truncated_adapter": (lora_yaml, lora_weights[: len(lora_weights) // 2]),
        "r_negative": (
            yaml.safe_dump(
                {**meta, "method": {**meta["method"], "init_args": {**meta["method"]["init_args"], "r": -1}}}
            ),
            lora_weights,
        ),
        "method_unknown": (yaml.safe_dump({**meta, "method": {"class_path": "NoSuchMethod"}}), lora_weights),
    }
    for name, (text, data) in broken.items():
        (fx / name).mkdir()
        (fx / name / "adapter.yaml").write_text(text)
        (fx / name / "adapter.safetensors").write_bytes(data)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's digest, or ``dir``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    returncode: int
    stderr: str
    stdout: str
    changed: list[str]


class Zygote:
    """A warm interpreter that forks one child per command line (tests/cli_zygote.py)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
        stdout, stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
        request = dict(argv=argv, cwd=str(cwd), env=env, stdout=str(stdout), stderr=str(stderr))
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return subprocess.CompletedProcess(argv, answer["returncode"], stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        self.process.wait(timeout=60)


def case_env(case_id: str, fx: Path, work: Path) -> dict[str, str]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", LITPEFT_CACHE=str(work / f"{case_id}.cache"), HF_HOME=str(fx / "hf")
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_case(case: Case, fx: Path, work: Path, zygote: Zygote | None = None) -> Outcome:
    cwd = work / case.id
    cwd.mkdir()
    for rel, text in case.files.items():
        (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
        (cwd / rel).write_text(text)
    before = snapshot(cwd)
    env = case_env(case.id, fx, work)
    argv = [a.replace("{fx}", str(fx)) for a in case.argv]
    if zygote is None:
        result = subprocess.run(
            [sys.executable, "-m", "litpeft", *argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    else:
        result = zygote.run(argv, cwd, {"LITPEFT_CACHE": env["LITPEFT_CACHE"]}, work / case.id)
    after = snapshot(cwd)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(result.returncode, result.stderr, result.stdout, changed)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fx = tmp_path_factory.mktemp("fixtures")
    torch.manual_seed(0)
    _write_fixtures(fx)
    (fx / "cache").mkdir()
    (fx / "hf").mkdir()
    return fx


def _run_all(cases: list[Case], fx: Path, work: Path, warm: bool = False) -> dict[str, Outcome]:
    """Each case's outcome; ``"fixtures"``: the shared fixture files any of them changed. ``warm``: fork
    each case from a warm interpreter instead of starting a fresh one."""
    before = snapshot(fx)
    zygotes: queue.Queue[Zygote | None] = queue.Queue()
    for _ in range(2):
        zygotes.put(Zygote(case_env("zygote", fx, work)) if warm else None)

    def run(case: Case) -> Outcome:
        zygote = zygotes.get()
        try:
            return run_case(case, fx, work, zygote)
        finally:
            zygotes.put(zygote)

    try:
        with ThreadPoolExecutor(2) as pool:
            outcomes = dict(zip([c.id for c in cases], pool.map(run, cases), strict=True))
    finally:
        while not zygotes.empty():
            zygote = zygotes.get()
            if zygote is not None:
                zygote.close()
    after = snapshot(fx)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    outcomes["fixtures"] = Outcome(0, "", "", changed)
    return outcomes


@pytest.fixture(scope="module")
def fast_outcomes(fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return _run_all([c for c in CASES if c.fast], fixtures, tmp_path_factory.mktemp("fast"))


@pytest.fixture(scope="module")
def slow_outcomes(fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return _run_all([c for c in CASES if not c.fast], fixtures, tmp_path_factory.mktemp("slow"), warm=True)


def check(case: Case, outcome: Outcome, fx: Path) -> None:
    output = outcome.stderr + outcome.stdout
    assert outcome.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    lines = [ln for ln in outcome.stderr.splitlines() if ln.startswith("litpeft: error:")]
    assert len(lines) == 1, output[-3000:]
    assert case.names.replace("{fx}", str(fx)) in lines[0], lines[0]
    assert not outcome.changed, f"{lines[0]}\nchanged: {outcome.changed}"


def test_catalogue_is_large_and_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.fast], ids=lambda c: c.id)
def test_bad_input_fast(case: Case, fast_outcomes: dict[str, Outcome], fixtures: Path) -> None:
    check(case, fast_outcomes[case.id], fixtures)


def test_fast_slice_leaves_fixtures_alone(fast_outcomes: dict[str, Outcome]) -> None:
    assert not fast_outcomes["fixtures"].changed


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not c.fast], ids=lambda c: c.id)
def test_bad_input(case: Case, slow_outcomes: dict[str, Outcome], fixtures: Path) -> None:
    check(case, slow_outcomes[case.id], fixtures)


@pytest.mark.slow
def test_catalogue_leaves_fixtures_alone(slow_outcomes: dict[str, Outcome]) -> None:
    assert not slow_outcomes["fixtures"].changed
