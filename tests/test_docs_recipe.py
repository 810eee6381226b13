"""The "add a method" recipe of docs/architecture.md, run as written: its code block is the method file."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from litpeft.methods import METHODS, adapters_disabled, method_from_config
from litpeft.models import load_model
from tests.conftest import REPO, run_cli

DOC = REPO / "docs" / "architecture.md"


def _recipe_source() -> str:
    """The first ``python`` block after the heading "Adding a method"."""
    text = DOC.read_text()
    section = text.split("## Adding a method", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "docs/architecture.md: no python block under 'Adding a method'"
    return match.group(1)


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The documented file saved as ``my_methods.py`` and imported, as a user would; unregistered after."""
    (tmp_path / "my_methods.py").write_text(_recipe_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    before = dict(METHODS)
    module = importlib.import_module("my_methods")
    yield module
    sys.modules.pop("my_methods", None)
    METHODS.clear()
    METHODS.update(before)


def test_the_recipe_registers_its_short_name_and_starts_as_the_base(recipe) -> None:
    cls = recipe.IA3FeedForward
    assert METHODS[cls.name] is cls
    assert type(method_from_config({"class_path": cls.name})) is cls
    model = load_model("tiny:llama")
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    cls().apply(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # one vector of the FFN's inner width per decoder layer, nothing else
    config = model.config
    assert sum(trainable.values()) == config.num_hidden_layers * config.intermediate_size
    assert all(n.endswith("down_proj.ia3_scale") for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)  # l = 1: the base model at step 0
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        changed = model(input_ids=ids).logits
        with adapters_disabled(model):
            assert torch.equal(model(input_ids=ids).logits, base)
    assert not torch.allclose(changed, base)


def test_the_recipe_trains_and_its_adapter_loads_by_class_path(
    recipe, tmp_path: Path, word_data: Path
) -> None:
    """``litpeft fit`` with ``class_path: my_methods.IA3FeedForward``, then ``litpeft generate`` on its adapter."""
    config = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
    config["model"]["init_args"]["model"] = "tiny:llama"
    config["model"]["init_args"]["method"] = {"class_path": "my_methods.IA3FeedForward"}
    config["data"]["init_args"].update(train_file=str(word_data), batch_size=4, max_seq_length=64)
    config["trainer"].update(
        max_steps=2, precision="32-true", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False
    )
    (tmp_path / "ia3.yaml").write_text(yaml.safe_dump(config))
    fit = run_cli("fit", "--config", str(tmp_path / "ia3.yaml"), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    adapter = tmp_path / "runs" / "lightning_logs" / "version_0" / "adapter"
    meta = yaml.safe_load((adapter / "adapter.yaml").read_text())
    assert meta["method"]["class_path"] == "my_methods.IA3FeedForward"
    assert meta["trainable_parameters"] == 2 * 128  # tiny:llama: 2 layers, FFN width 128
    answer = run_cli(
        "generate",
        "--adapter",
        str(adapter),
        "--prompt",
        "Reverse the word.",
        "--max_new_tokens",
        "4",
        cwd=tmp_path,
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    merged = run_cli("merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"), cwd=tmp_path)
    assert merged.returncode == 2 and "'ia3_ff' cannot be merged" in merged.stderr, merged.stderr[-3000:]
    assert not (tmp_path / "merged").exists()
