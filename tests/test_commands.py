"""What every adapter command shares: registration, ``--help``, and clear errors that write nothing."""

from __future__ import annotations

import importlib
import shutil

import pytest
from adapter_helpers import error_line, main_error, make_adapter, run_litpeft, save_other_base, write_jsonl

from litpeft import commands
from litpeft.cli import TOOLS, main
from litpeft.commands import COMMANDS
from litpeft.methods import LoRA

NAMES = ["generate", "evaluate", "merge", "export"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    good = make_adapter(root / "adapter", "tiny:llama", LoRA(r=2))
    corrupted = shutil.copytree(good, root / "corrupted")
    data = (good / "adapter.safetensors").read_bytes()
    (corrupted / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    other_base = save_other_base(root / "other-base")
    data_file = write_jsonl(root / "val.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    return {"good": good, "corrupted": corrupted, "other_base": other_base, "data": data_file, "root": root}


def _argv(command: str, adapter, out, data, model=None) -> list[str]:
    argv = [command, "--adapter", str(adapter)]
    if command == "generate":
        argv += ["--input", str(data), "--output", str(out)]
    elif command == "evaluate":
        argv += ["--data", str(data), "--output", str(out)]
    else:
        argv += ["--output", str(out)]
    return argv + (["--model", str(model)] if model else [])


def test_commands_are_registered() -> None:
    for name in NAMES:
        assert TOOLS[name] is COMMANDS[name]


@pytest.mark.parametrize("command", NAMES)
def test_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: litpeft {command}") and "--config CONFIG" in out and "--adapter" in out


ERRORS = {
    "missing": ("adapter directory '{root}/nope' does not exist", lambda d: (d["root"] / "nope", None)),
    "corrupted": ("corrupted or unreadable adapter weights", lambda d: (d["corrupted"], None)),
    "other_base": ("--allow_other_base true uses it anyway", lambda d: (d["good"], d["other_base"])),
}


@pytest.mark.parametrize("command", NAMES)
@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_bad_adapter_one_line_error_nothing_written(command, kind, dirs, tmp_path, capsys) -> None:
    message, pick = ERRORS[kind]
    adapter, model = pick(dirs)
    out = tmp_path / "out"
    assert message.format(root=dirs["root"]) in main_error(
        capsys, *_argv(command, adapter, out, dirs["data"], model)
    )
    assert not out.exists() and not list(tmp_path.iterdir())
    assert not list(dirs["good"].glob("eval-*")) and not list(dirs["corrupted"].glob("eval-*"))


@pytest.mark.parametrize(
    ("command", "kind"), [("generate", "missing"), ("merge", "other_base"), ("export", "corrupted")]
)
def test_bad_adapter_in_a_subprocess(command, kind, dirs, tmp_path) -> None:
    message, pick = ERRORS[kind]
    adapter, model = pick(dirs)
    result = run_litpeft(*_argv(command, adapter, tmp_path / "out", dirs["data"], model))
    assert result.returncode == 2
    assert message.format(root=dirs["root"]) in error_line(result)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "module"),
    [("chat", "litpeft.inference"), ("row_messages", "litpeft.inference"), ("rouge_l", "litpeft.evaluation")],
)
def test_helpers_that_moved_out_still_import_with_a_warning(name, module) -> None:
    with pytest.warns(FutureWarning, match=rf"litpeft.commands.{name} moved to {module}.{name}"):
        assert getattr(commands, name) is getattr(importlib.import_module(module), name)
