"""``litpeft.generation`` is a deprecated alias: its names and the callback's old class_path still work."""

from __future__ import annotations

import subprocess

import lightning as L
import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import instantiate_class

import litpeft.generation as old
from litpeft import evaluation, inference
from tests.conftest import REPO, run_cli

MOVED = {
    "generate": inference,
    "split_for_generation": inference,
    "exact_match": evaluation,
    "normalize": evaluation,
    "ExactMatchEvaluation": evaluation,
}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_names_resolve_to_the_new_ones_with_a_warning(name) -> None:
    with pytest.warns(
        FutureWarning, match=rf"litpeft.generation.{name} moved to {MOVED[name].__name__}.{name}"
    ):
        assert getattr(old, name) is getattr(MOVED[name], name)
    with pytest.raises(AttributeError):
        old.not_a_name  # noqa: B018


OLD_CALLBACK = {"class_path": "litpeft.generation.ExactMatchEvaluation", "init_args": {"limit": 3}}


def test_old_class_path_instantiates_the_callback() -> None:
    with pytest.warns(FutureWarning, match="litpeft.evaluation.ExactMatchEvaluation"):
        callback = instantiate_class((), OLD_CALLBACK)
    assert type(callback) is evaluation.ExactMatchEvaluation and callback.limit == 3
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.Callback])
    with pytest.warns(FutureWarning, match="litpeft.evaluation.ExactMatchEvaluation"):
        (parsed,) = parser.instantiate_classes(parser.parse_object({"callbacks": [OLD_CALLBACK]})).callbacks
    assert type(parsed) is evaluation.ExactMatchEvaluation and parsed.limit == 3


def test_demo_config_names_the_new_class_path() -> None:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "litpeft.evaluation.ExactMatchEvaluation" in paths


def test_a_config_with_the_old_class_path_still_parses(tmp_path) -> None:
    text = (REPO / "configs" / "demo.yaml").read_text()
    old = text.replace("litpeft.evaluation.ExactMatchEvaluation", "litpeft.generation.ExactMatchEvaluation")
    assert old != text
    (tmp_path / "old.yaml").write_text(old)
    result: subprocess.CompletedProcess = run_cli(
        "fit", "--config", "old.yaml", "--print_config", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "litpeft.generation.ExactMatchEvaluation moved to litpeft.evaluation.ExactMatchEvaluation" in (
        result.stderr
    )
    (callback,) = [
        c for c in yaml.safe_load(result.stdout)["trainer"]["callbacks"] if "Exact" in c["class_path"]
    ]
    assert callback["init_args"] == {"limit": None, "max_new_tokens": 12, "batch_size": 50}
