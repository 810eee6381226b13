"""The ``litpeft`` command as a user runs it: a fit from a config, and one clear line for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli, write_jsonl


def _tiny_config(tmp_path: Path, data: Path) -> Path:
    """configs/lora.yaml with a tiny model, the test data and a few steps: what a user would edit."""
    config = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
    config["model"]["init_args"]["model"] = "tiny:llama"
    config["data"]["init_args"].update(train_file=str(data), batch_size=4, max_seq_length=64)
    config["trainer"].update(
        max_steps=4, precision="32-true", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_end_to_end_from_a_config(tmp_path: Path, word_data: Path) -> None:
    result = run_cli("fit", "--config", str(_tiny_config(tmp_path, word_data)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (run / "adapter" / "adapter.safetensors").is_file() and (
        run / "adapter" / "adapter.yaml"
    ).is_file()
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").is_file()  # one checkpoint dir per run
    meta = yaml.safe_load((run / "adapter" / "adapter.yaml").read_text())
    assert meta["base_model"] == "tiny:llama" and meta["method"]["class_path"] == "litpeft.methods.lora.LoRA"
    assert meta["prompt_style"] == "chat_template"


def test_print_config_runs_as_is(tmp_path: Path, word_data: Path) -> None:
    printed = run_cli(
        "fit", "--config", str(_tiny_config(tmp_path, word_data)), "--print_config", cwd=tmp_path
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    full = tmp_path / "full.yaml"
    full.write_text(printed.stdout)
    assert yaml.safe_load(printed.stdout)["model"]["init_args"]["method"]["init_args"]["r"] == 16
    result = run_cli("fit", "--config", str(full), "--trainer.max_steps", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_user_subclass_by_class_path(tmp_path: Path, word_data: Path) -> None:
    """A user's own PeftLM and LoRA subclasses, named by class_path, are what runs."""
    (tmp_path / "my_ext.py").write_text(
        "from litpeft import PeftLM, LoRA\n"
        "class MyLoRA(LoRA):\n"
        "    def inject(self, model):\n"
        "        super().inject(model)\n"
        "        open('my_lora_ran', 'w').write('yes')\n"
        "class MyLM(PeftLM):\n"
        "    def on_fit_end(self):\n"
        "        super().on_fit_end()\n"
        "        open('my_lm_ran', 'w').write(type(self.method).__name__)\n"
    )
    config = yaml.safe_load(_tiny_config(tmp_path, word_data).read_text())
    config["model"]["class_path"] = "my_ext.MyLM"
    config["model"]["init_args"]["method"] = {"class_path": "my_ext.MyLoRA", "init_args": {"r": 2}}
    (tmp_path / "sub.yaml").write_text(yaml.safe_dump(config))
    import os

    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(tmp_path) + os.pathsep + env_path
    try:
        result = run_cli("fit", "--config", str(tmp_path / "sub.yaml"), cwd=tmp_path)
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "my_lora_ran").read_text() == "yes"
    assert (tmp_path / "my_lm_ran").read_text() == "MyLoRA"


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.bogus", "1"], "unknown option 'bogus'"),
        (["--model.method.class_path", "NoSuchMethod"], "unknown class 'NoSuchMethod'"),
        (["--model.model", "./no/such/model"], "model path './no/such/model' does not exist"),
        (["--data.train_file", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["--data.train_file", "BAD"], "BAD_PATH:2: field 'output' is missing or empty"),
        (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz"),
        # a traceback of 84 lines before (the ValueError came out of jsonargparse's instantiation)
        (
            ["--model.method.init_args.r", "-1"],
            "model.method.init_args.r: -1 is not allowed; LoRA's rank must be a positive integer",
        ),
        # "Does not validate against any of the Union subtypes" before
        (["--model.method.init_args.r", "sixteen"], "model.method.init_args.r: 'sixteen' is not allowed"),
        # a traceback from configure_optimizers, after lightning_logs/version_0 was written
        (["--optimizer.init_args.lr", "-1"], "optimizer.init_args.lr: -1.0 is not allowed"),
        # one line, but after lightning_logs/version_0/config.yaml was written
        (["--model.method.init_args.target_modules", "[nope]"], "model.method.init_args.target_modules"),
        # trained on the bundled date task without a word before
        (["--data.train_file", "null"], "data.train_file is not set"),
    ],
)
def test_bad_input_gives_one_clear_line_and_writes_nothing(
    tmp_path: Path,
    word_data: Path,
    override: list[str],
    message: str,
) -> None:
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "no output"}]
    )
    override = [str(bad) if o == "BAD" else o for o in override]
    message = message.replace("BAD_PATH", str(bad))
    before = set(tmp_path.rglob("*"))
    result = run_cli("fit", "--config", str(_tiny_config(tmp_path, word_data)), *override, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"litpeft: error: {message}" or (
        last.startswith("litpeft: error: ") and message in last
    ), last
    assert "Traceback" not in result.stderr
    assert set(tmp_path.rglob("*")) == before | {tmp_path / "tiny.yaml"}


def test_unknown_key_in_config_file(tmp_path: Path, word_data: Path) -> None:
    config = yaml.safe_load(_tiny_config(tmp_path, word_data).read_text())
    config["data"]["init_args"]["bach_size"] = 4
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("fit", "--config", str(tmp_path / "typo.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "litpeft: error: data: unknown option 'bach_size'"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_overview_lists_trainer_and_tool_commands(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from litpeft.cli import TOOLS, main

    main(argv)
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()}
    assert listed == {"fit", "validate", "test", "predict", *TOOLS}
    assert {"generate", "evaluate", "merge", "export"} <= set(TOOLS)


def test_fit_writes_the_adapter_where_the_checks_passed(tmp_path: Path, word_data: Path) -> None:
    """The checks before a fit (outputs, optimizer, checkpoint, a meta build of the method) pass a good
    config with a single-string target, and the run trains exactly the layers that string names."""
    result = run_cli(
        "fit",
        "--config",
        str(_tiny_config(tmp_path, word_data)),
        "--model.method.init_args.target_modules",
        "q_proj",
        "--trainer.max_steps",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    adapter = tmp_path / "runs" / "lightning_logs" / "version_0" / "adapter" / "adapter.safetensors"
    layers = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in load_file(str(adapter))}
    assert layers == {"q_proj"}


def test_a_step_bounded_run_you_can_watch(tmp_path: Path, word_data: Path) -> None:
    """The real command on a tiny model: a quiet console (no Lightning tips), a bar over the run's steps
    (not "Epoch 0/-2"), a model summary that counts each tensor once under bf16-mixed (the tied head's
    bf16 copy is no parameter), TensorBoard by default with speed and memory at each log step, and the
    method's own LR when the config's is another method's."""
    from lightning.pytorch.utilities.model_summary import get_human_readable_count
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from litpeft.models import load_model

    result = run_cli(
        "fit",
        "--config",
        str(_tiny_config(tmp_path, word_data)),
        "--model.method",
        "PromptTuning",
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.max_epochs",
        "null",
        "--trainer.max_steps",
        "8",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.enable_progress_bar",
        "true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "Tip" not in console and "litlogger" not in console and "Epoch" not in console
    assert "step" in console and "8/8" in console, console[-2000:]
    assert "learning rate 0.03: PromptTuning's recommended" in console
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["init_args"]["lr"] == 0.03
    base = load_model("tiny:llama")
    assert base.config.tie_word_embeddings  # the case that used to count the head twice
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    total = sum(p.numel() for p in base.parameters()) + sum(t.numel() for t in adapter.values())
    assert f"Total params: {get_human_readable_count(total)}" in console
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "perf/tokens_per_sec", "perf/loss_tokens_per_sec", "perf/peak_rss_gb"} <= scalars
    assert [e.step for e in events.Scalars("perf/tokens_per_sec")] == [1, 3, 5, 7]
    assert "perf/mfu" not in scalars  # no peak FLOPs known for a CPU: no made-up MFU


_LOGGER = '''
import json
from lightning.pytorch.loggers.logger import Logger

class Recording(Logger):
    """A logger with W&B's save_dir (".", the working directory) or MLflow's with a server (None)."""

    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__()
        self._save_dir = save_dir

    name = property(lambda self: "recording")
    version = property(lambda self: 0)
    save_dir = property(lambda self: self._save_dir)

    def log_metrics(self, metrics, step=None):
        with open("metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\\n")

    def log_hyperparams(self, params, *args, **kwargs):
        with open("hparams.json", "w") as f:
            json.dump(params, f)
'''


@pytest.mark.parametrize("save_dir", [".", None], ids=["wandb-like", "mlflow-server-like"])
def test_a_logger_without_a_run_directory_of_its_own(
    tmp_path: Path, word_data: Path, save_dir: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's W&B and MLflow lines: for loggers other than TensorBoard/CSV, Lightning's log_dir is the
    logger's save_dir. The adapter and config.yaml go to default_root_dir instead: not into the working
    directory (W&B's ".", shared by every run), and no AssertionError (MLflow with a database or a server:
    None). The metrics reach the logger at Lightning's log steps."""
    (tmp_path / "my_logger.py").write_text(_LOGGER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = ["--trainer.logger", "my_logger.Recording"]
    args += ["--trainer.logger.save_dir", save_dir] if save_dir else []
    config = str(_tiny_config(tmp_path, word_data))
    result = run_cli("fit", "--config", config, "--trainer.log_every_n_steps", "2", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs"
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "config.yaml").is_file()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "config.yaml").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # max_steps 4, every 2: Lightning logs when (step + 1) % 2 == 0 (0-based), as in the TensorBoard test
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 3]
    assert [r["step"] for r in rows if "perf/tokens_per_sec" in r] == [1, 3]
    # the run's config as hyperparameters (W&B's config panel, MLflow's params), flat, one key per value
    params = json.loads((tmp_path / "hparams.json").read_text())
    tiny = yaml.safe_load(Path(config).read_text())
    assert params["model/method"].startswith("litpeft.methods.") and params["model/method"].endswith(".LoRA")
    assert params["model/method/r"] == tiny["model"]["init_args"]["method"]["init_args"]["r"]
    assert params["optimizer/lr"] == tiny["optimizer"]["init_args"]["lr"]
    assert params["trainer/max_steps"] == 4 and params["trainer/log_every_n_steps"] == 2
    assert all(not isinstance(v, dict | list) for v in params.values())


def test_lr_source(tmp_path: Path) -> None:
    from litpeft.method_switch import lr_source

    lora = str(REPO / "configs" / "lora.yaml")
    assert lr_source(["fit", "--config", lora], "LoRA") == (lora, None)
    assert lr_source(["fit", "--config", lora, "--model.method", "PromptTuning"], "PromptTuning") == (
        None,
        f"the lr in {lora} is LoRA's",
    )
    assert lr_source(["fit", f"--config={lora}", "--optimizer.init_args.lr", "0.1"], "PromptTuning") == (
        "the command line",
        None,
    )
    assert lr_source(["fit", "--optimizer.lr=0.1"], "LoRA") == ("the command line", None)
    assert lr_source(["fit", "--model.method", "LoRA"], "LoRA") == (None, None)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"optimizer": {"init_args": {"lr": 0.1}}}))  # names no method: the user's
    assert lr_source(["fit", "-c", str(mine), "--model.method", "PromptTuning"], "PromptTuning") == (
        str(mine),
        None,
    )


def test_recommended_lrs_are_the_shipped_configs(tmp_path: Path) -> None:
    from litpeft.methods import METHODS

    for path in (REPO / "configs").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        name = config["model"]["init_args"]["method"]["class_path"].rsplit(".", 1)[-1]
        cls = next(c for c in METHODS.values() if c.__name__ == name)
        # the demo's LR is tuned for its own short run; a preference objective (dpo.yaml) wants its own
        if path.stem == "demo" or "PreferenceLM" in config["model"].get("class_path", ""):
            continue
        assert cls.learning_rate == config["optimizer"]["init_args"]["lr"], path.name


def test_fit_help_says_how_to_see_the_model_and_method_options(capsys: pytest.CaptureFixture[str]) -> None:
    from litpeft.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    head, tail = lines[:6], " ".join(lines[-4:])
    assert any("litpeft fit --model.method.help LoRA" in line for line in head), head
    assert any("PromptTuning" in line for line in head)
    assert "--model.method.help LoRA" in tail, tail  # and again after the ~500 lines
    with pytest.raises(SystemExit):
        main(["fit", "--model.method.help", "LoRA"])  # the line it shows works: LoRA's own options
    out = capsys.readouterr().out
    assert "--method.r R" in out and "--method.use_dora" in out


def test_only_an_explicit_demo_trains_on_the_bundled_set() -> None:
    from litpeft.data import InstructionDataModule
    from litpeft.data.sources import DEMO_DIR
    from litpeft.errors import LitPeftError

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["data"]["init_args"]["train_file"]
    dm = InstructionDataModule(demo)
    lines = {s: len((DEMO_DIR / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "val")}
    assert (len(dm.train_samples), len(dm.val_samples)) == (lines["train"], lines["val"])
    with pytest.raises(LitPeftError, match="data.train_file is not set"):
        InstructionDataModule()
    for path in (REPO / "configs").glob("*.yaml"):  # the other shipped configs name no data
        if path.stem != "demo":
            assert yaml.safe_load(path.read_text())["data"]["init_args"]["train_file"] is None, path.name
