"""Switching the method on the command line (``--config configs/lora.yaml --model.method VeRA``): the new
method's own defaults, not the arguments jsonargparse keeps from the previous one; the user's are kept."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from litpeft.cli import LitPeftCLI
from litpeft.methods import OFT, VeRA
from tests.conftest import REPO

LORA = str(REPO / "configs" / "lora.yaml")


class _Parsed(Exception):
    """Stops the CLI once the config is final: no model, data or trainer is built."""


class _ParseOnly(LitPeftCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        before = copy.deepcopy(config["model"]["init_args"]["method"]).as_dict()
        super().before_instantiate_classes()
        raise _Parsed(before, config["model"]["init_args"]["method"].as_dict())


def _parse(*argv: str) -> tuple[Any, Any]:
    """``(the method jsonargparse parsed, the method the fit builds)`` for a command line, as dicts
    (``fit ...``: as a fit parses it, up to building the classes)."""
    with pytest.raises(_Parsed) as parsed:
        _ParseOnly(args=list(argv), run=argv[0] == "fit")
    return parsed.value.args


def _vera_config() -> dict[str, Any]:
    """configs/vera.yaml's method: an oracle for VeRA's defaults independent of the code under test."""
    return yaml.safe_load((REPO / "configs" / "vera.yaml").read_text())["model"]["init_args"]["method"]


def test_a_switch_from_a_config_takes_the_new_methods_defaults(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before, after = _parse("--config", LORA, "--model.method", "VeRA")
    assert (before["init_args"]["r"], before["init_args"]["dropout"]) == (16, 0.05)  # jsonargparse's rule
    assert after["init_args"] == _vera_config()["init_args"]
    assert (
        f"method VeRA: r: 256, VeRA's default (the 16 in {LORA} is LoRA's); "
        f"dropout: 0.0, VeRA's default (the 0.05 in {LORA} is LoRA's)"
    ) in caplog.messages
    assert _parse("fit", "--config", LORA, "--model.method", "VeRA")[1] == after  # a fit's parse too

    before, after = _parse("--config", LORA, "--model.method", "litpeft.methods.OFT")
    assert before["init_args"]["r"] == 16
    with pytest.raises(ValueError, match="set exactly one of r and oft_block_size"):
        OFT(**before["init_args"])  # what the fit used to fail with
    method = OFT(**after["init_args"])
    assert (method.r, method.oft_block_size) == (0, 32)


def test_a_switch_from_the_default_method(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before, after = _parse("--model.method", "VeRA")  # no config: PeftLM's default LoRA(r=8)
    assert before["init_args"]["r"] == 8
    assert after["init_args"]["r"] == _vera_config()["init_args"]["r"] == VeRA().r == 256
    assert "method VeRA: r: 256, VeRA's default (the 8 was the previous method's)" in caplog.messages
    _, after = _parse("--model.method", "OFT")
    assert (after["init_args"]["r"], after["init_args"]["oft_block_size"]) == (0, 32)


@pytest.mark.parametrize(
    "given",
    [
        ("--model.method.init_args.r", "4"),
        ("--model.init_args.method.init_args.r=4",),
        ("--model.method.init_args", '{"r": 4}'),
        ("--model.method", json.dumps({"class_path": "VeRA", "init_args": {"r": 4}})),
    ],
)
def test_an_arg_set_for_the_new_method_is_kept(given: tuple[str, ...]) -> None:
    _, after = _parse("--config", LORA, "--model.method", "VeRA", *given)
    assert after["init_args"]["r"] == 4
    assert after["init_args"]["dropout"] == 0.0  # LoRA's 0.05 still goes


def test_a_config_naming_the_method_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {"method": {"class_path": "VeRA", "init_args": {"r": 64, "dropout": 0.1}}}
                }
            }
        )
    )
    _, after = _parse("--config", LORA, "--config", str(mine))
    assert (after["init_args"]["r"], after["init_args"]["dropout"]) == (64, 0.1)
    assert not [m for m in caplog.messages if m.startswith("method ")]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_configs_are_unchanged(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before, after = _parse("--config", str(path))
    assert after == before
    written = yaml.safe_load(path.read_text())["model"]["init_args"]["method"]
    assert {k: after["init_args"][k] for k in written.get("init_args", {})} == written.get("init_args", {})
    assert not [m for m in caplog.messages if m.startswith("method ")]


def test_print_config_prints_what_the_fit_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        LitPeftCLI(args=["fit", "--config", LORA, "--model.method", "VeRA", "--print_config"])
    assert exit_.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    config = yaml.safe_load(printed.read_text())
    assert config["model"]["init_args"]["method"]["init_args"] == _vera_config()["init_args"]
    assert config["optimizer"]["init_args"]["lr"] == VeRA.learning_rate == 4e-3
    caplog.clear()
    caplog.set_level(logging.INFO)
    before, after = _parse("fit", "--config", str(printed))  # runs as printed: nothing left to reset
    assert after == before and after["init_args"]["r"] == 256
    assert not [m for m in caplog.messages if m.startswith("method ")]
