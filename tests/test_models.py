"""Model specs: tiny models, local directories, GGUF conversion, offline hub ids, remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from litpeft.errors import LitPeftError
from litpeft.models import TINY_CONFIGS, describe, load_model, load_tokenizer, resolve_spec


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_models_are_deterministic_and_run(arch: str) -> None:
    tok = load_tokenizer(f"tiny:{arch}")
    a, b = load_model(f"tiny:{arch}", tokenizer=tok), load_model(f"tiny:{arch}", tokenizer=tok)
    x = tok(["hello world"], return_tensors="pt").input_ids
    assert torch.equal(a(x).logits, b(x).logits)
    assert a(x).logits.shape[-1] == len(tok)
    assert describe(a)["trainable"] == 0


def test_tiny_tokenizer_round_trips_text_and_has_chat_template() -> None:
    tok = load_tokenizer("tiny:llama")
    text = "Grüße, world! 123"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.pad_token_id != tok.eos_token_id
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_local_directory_round_trip(tmp_path: Path) -> None:
    model, tok = load_model("tiny:qwen2"), load_tokenizer("tiny:qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(again(x).logits, model(x).logits)
    assert load_tokenizer(str(tmp_path / "m"))("abc").input_ids == tok("abc").input_ids


def test_missing_paths_and_uncached_hub_ids_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(LitPeftError, match="model path './does/not/exist' does not exist"):
        resolve_spec("./does/not/exist")
    with pytest.raises(LitPeftError, match=r"model file 'x\.gguf' does not exist"):
        resolve_spec("x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LitPeftError, match="has no config.json"):
        resolve_spec(str(tmp_path / "empty"))
    with pytest.raises(
        LitPeftError, match="not in the Hugging Face cache .*HF_HUB_OFFLINE=1; run `litpeft download"
    ):
        load_tokenizer("someone/never-downloaded-model")
    with pytest.raises(LitPeftError, match="model path 'a/b/c' does not exist"):
        load_tokenizer("a/b/c")
    with pytest.raises(LitPeftError, match="unknown tiny model 'tiny:nope'"):
        load_model("tiny:nope")


def test_remote_code_never_runs_by_default(tmp_path: Path) -> None:
    """A model directory whose config points at its own code: loading must refuse, not import it."""
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "code-ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (d / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                },
            }
        )
    )
    with pytest.raises(LitPeftError, match="trust_remote_code"):
        load_model(str(d))
    assert not marker.exists()
