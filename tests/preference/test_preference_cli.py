"""``litpeft fit --config configs/dpo.yaml`` end to end on a tiny model, then ORPO from its adapter."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from adapter_helpers import REPO

from litpeft.adapter_dir import load_adapter
from litpeft.cli import main

TINY = [
    "--model.init_args.model", "tiny:llama",
    "--data.init_args.train_file", "demo",
    "--trainer.accelerator", "cpu",
    "--trainer.precision", "32-true",
    "--trainer.max_steps", "2",
    "--trainer.val_check_interval", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "1",
    "--data.init_args.batch_size", "2",
    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
]  # fmt: skip


def _metrics(root: Path) -> list[dict[str, str]]:
    (path,) = root.glob("**/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_dpo_config_fits_and_an_orpo_run_starts_from_its_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(REPO / "configs" / "dpo.yaml"), *TINY, "--trainer.logger.save_dir", "dpo",
          "--model.init_args.adapter_dir", "dpo/adapter"])  # fmt: skip
    rows = _metrics(tmp_path / "dpo")
    logged = {k for row in rows for k, v in row.items() if v}
    expected = {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin"}
    assert expected | {"train/rewards/accuracy", "val/loss", "val/rewards/accuracy"} <= logged
    meta = yaml.safe_load((tmp_path / "dpo" / "adapter" / "adapter.yaml").read_text())
    assert meta["method"]["class_path"] == "litpeft.methods.lora.LoRA"
    assert meta["prompt_style"] == "chat_template"  # the model's own
    load_adapter(tmp_path / "dpo" / "adapter")  # what `litpeft generate --adapter` loads

    main(["fit", "--config", str(REPO / "configs" / "dpo.yaml"), *TINY, "--trainer.logger.save_dir", "orpo",
          "--model.init_args.loss", "orpo", "--model.init_args.init_adapter", "dpo/adapter",
          "--trainer.default_root_dir", "runs/orpo", "--model.init_args.adapter_dir", "orpo/adapter"])  # fmt: skip
    assert {"train/log_odds_ratio", "train/nll"} <= {
        k for row in _metrics(tmp_path / "orpo") for k, v in row.items() if v
    }
    assert (tmp_path / "orpo" / "adapter" / "adapter.safetensors").is_file()


def test_a_bad_loss_in_the_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "dpo.yaml"), *TINY, "--model.init_args.loss", "kto"])
    err = capsys.readouterr().err.strip()
    assert err == "litpeft: error: model.loss: 'kto' is not allowed; expected one of: dpo, ipo, orpo, simpo"
