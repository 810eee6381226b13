"""Input errors in-process: jsonargparse's messages rewritten to one line, method arguments, a single-string
``target_modules``, and outputs that are never overwritten or deleted unless litpeft wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapter_helpers import make_adapter, read_jsonl, write_jsonl

from litpeft import export
from litpeft.commands import generate, merge
from litpeft.errors import InvalidArgument, LitPeftError, parse_error_line
from litpeft.files import check_writable
from litpeft.methods import LoRA, PromptTuning, method_from_config
from litpeft.models import load_model

UNION_ERROR = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'litpeft.module.PeftLM'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'litpeft.module.PeftLM':
        Parser key "method":
          Problem with given class_path 'litpeft.methods.LoRA':
            Parser key "r":
              Expected a <class 'int'>. Got value: sixteen
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='method.init_args.r', val='sixteen')"""

LITERAL_ERROR = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'litpeft.module.PeftLM':
        Parser key "quantize":
          Does not validate against any of the Union subtypes
          Subtypes: [typing.Literal['nf4', 'nf4-dq', 'fp4', 'int8'], <class 'NoneType'>]
          Errors:
            - Expected a typing.Literal['nf4', 'nf4-dq', 'fp4', 'int8']
            - Expected a <class 'NoneType'>
          Given value type: <class 'str'>
          Given value: nf5
    - Expected a <class 'NoneType'>"""

UNKNOWN_CLASS = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'litpeft.module.PeftLM':
        Parser key "method":
          Expected a dot import path string: lora2
    - Expected a <class 'NoneType'>"""


@pytest.mark.parametrize(
    "message, line",
    [
        (UNION_ERROR, "model.method.init_args.r: 'sixteen' is not allowed; expected an integer"),
        (LITERAL_ERROR, "model.quantize: 'nf5' is not allowed; expected one of: nf4, nf4-dq, fp4, int8"),
        (UNKNOWN_CLASS, "model.method: unknown class 'lora2' (built-in methods: lora, prompt_tuning)"),
    ],
)
def test_jsonargparse_errors_become_one_line_with_key_value_and_allowed(message: str, line: str) -> None:
    assert parse_error_line(message, ["lora", "prompt_tuning"]) == line


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: LoRA(r=0), "r"),
        (lambda: LoRA(r=-1), "r"),
        (lambda: LoRA(alpha=0), "alpha"),
        (lambda: LoRA(dropout=1.0), "dropout"),
        (lambda: LoRA(target_modules=[]), "target_modules"),
        (lambda: LoRA(target_modules="(unclosed"), "target_modules"),
        (lambda: PromptTuning(num_virtual_tokens=0), "num_virtual_tokens"),
    ],
)
def test_method_arguments_are_checked_with_their_names(build, key: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        build()
    assert info.value.key == key and f"{key}: " in str(info.value) and "is not allowed" in str(info.value)


def test_adapter_yaml_argument_errors_name_the_key_in_the_file() -> None:
    with pytest.raises(InvalidArgument, match=r"^method\.init_args\.r: -1 is not allowed"):
        method_from_config({"class_path": "lora", "init_args": {"r": -1}})


def _adapted(method: LoRA) -> set[str]:
    model = method.apply(load_model("tiny:llama"))
    return {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}


def test_single_string_target_is_one_layer_name() -> None:
    """peft treats one string as a regex matched against the full name; ``q_proj`` then matches nothing.
    litpeft takes a plain name that matches no full name as that one name (the list form)."""
    assert _adapted(LoRA(target_modules="q_proj")) == _adapted(LoRA(target_modules=["q_proj"]))
    assert _adapted(LoRA(target_modules="q_proj")) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    # a regex that matches full names keeps peft's meaning
    assert _adapted(LoRA(target_modules=r"model\.layers\.0\..*q_proj")) == {"model.layers.0.self_attn.q_proj"}
    with pytest.raises(InvalidArgument, match="target_modules: 'nope' is not allowed.*q_proj"):
        _adapted(LoRA(target_modules="nope"))


def test_generate_refuses_an_existing_output_unless_overwrite(
    tiny_lora_adapter: Path, tmp_path: Path
) -> None:
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"mine": 1}\n')
    with pytest.raises(LitPeftError, match="out.jsonl' exists.*--overwrite"):
        generate(adapter=str(tiny_lora_adapter), input=str(prompts), output=str(out), max_new_tokens=2)
    assert out.read_text() == '{"mine": 1}\n'
    generate(
        adapter=str(tiny_lora_adapter), input=str(prompts), output=str(out), max_new_tokens=2, overwrite=True
    )
    assert "generated" in read_jsonl(out)[0]


def test_merge_overwrite_replaces_only_a_directory_litpeft_wrote(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", LoRA(r=2))
    out = tmp_path / "merged"
    merge(adapter=str(adapter), output=str(out))
    merge(adapter=str(adapter), output=str(out), overwrite=True)  # its own output: replaced
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(LitPeftError, match="notes.txt"):
        merge(adapter=str(adapter), output=str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "notes.txt").read_text() == "mine"


def test_output_checks_refuse_unwritable_places(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    for place in ("/proc/litpeft_out", "/sys/litpeft_out", str(tmp_path / "a_file" / "out")):
        with pytest.raises(LitPeftError, match="litpeft_out|a_file"):
            check_writable(place, "--output")
    check_writable(tmp_path / "new" / "deeper", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the probe left nothing
    with pytest.raises(LitPeftError, match="/proc/litpeft_m"):
        export.check_output_dir("/proc/litpeft_m", False, export.MERGED_FILES)
