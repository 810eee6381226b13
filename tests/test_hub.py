"""Hub models and datasets, downloaded on first use: against a stand-in hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
import yaml
from hub_server import HubServer, Repo, dir_files

from litpeft import hub
from litpeft.cli import main
from litpeft.data.sources import Alpaca, AutoSource
from litpeft.errors import LitPeftError
from litpeft.inference import read_conversations
from litpeft.methods import LoRA
from litpeft.models import load_model, load_tokenizer, pinned_spec, resolve_spec, tiny_tokenizer
from tests.conftest import make_adapter, run_cli, word_rows

TOKEN = "hf_test_token"
# The server fixture gives each test a private litpeft cache; the SmolLM2 test reuses the converted model.
USER_CACHE = os.environ.get("LITPEFT_CACHE")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A tiny llama saved as a hub repo holds it, plus files litpeft must never fetch."""
    d = tmp_path_factory.mktemp("tiny-repo")
    load_model("tiny:llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    files = dir_files(d)
    files.update(
        {
            "pytorch_model.bin": b"a pickle: never fetched when safetensors exist",
            "flax_model.msgpack": b"another format",
            "onnx/model.onnx": b"another format",
            "modeling_x.py": b"raise SystemExit('repo code ran')",
            "README.md": b"# tiny",
        }
    )
    return files


def _other_weights(files: dict[str, bytes], tmp: Path) -> dict[str, bytes]:
    """The same repo with different weights (another commit)."""
    model = load_model("tiny:llama")
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    model.save_pretrained(tmp)
    return {**files, "model.safetensors": (tmp / "model.safetensors").read_bytes()}


def _alpaca_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, cache: Path, offline: bool = False) -> None:
    """Send huggingface_hub (this process and subprocesses) to ``url`` with its cache under ``cache``.

    huggingface_hub reads these variables when it is imported, so its constants are patched too.
    """
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HOME", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hf_constants, "HF_URL_HOSTS", hf_constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)


@pytest.fixture
def server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_files: dict[str, bytes]
) -> Iterator[HubServer]:
    rows = word_rows()
    evil = {
        "config.json": json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "modeling_x.EvilConfig"}}
        ).encode(),
        "modeling_x.py": f"open({str(tmp_path / 'code-ran')!r}, 'w')\n".encode(),
    }
    srv = HubServer(
        models={
            "org/tiny": Repo.from_files(tiny_files),
            "org/gated": Repo.from_files(tiny_files, token=TOKEN),
            "org/private": Repo.from_files(tiny_files, token=TOKEN, gated=False),
            "org/evil": Repo.from_files(evil),
        },
        datasets={
            "org/words": Repo.from_files(
                {
                    "data/train.jsonl": _alpaca_jsonl(rows[:20]),
                    "data/test.jsonl": _alpaca_jsonl(rows[20:]),
                    "README.md": b"# words",
                }
            ),
            "org/dolly": Repo.from_files(
                {"dolly.jsonl": _alpaca_jsonl([{"q": r["input"], "a": r["output"]} for r in rows[:4]])}
            ),
        },
    ).start()
    point_hub_at(monkeypatch, srv.url, tmp_path / "hf")
    monkeypatch.setenv("LITPEFT_CACHE", str(tmp_path / "litpeft-cache"))
    yield srv
    srv.stop()


def _snapshot(repo: str, kind: str = "models") -> Path:
    snapshots = Path(hf_constants.HF_HUB_CACHE) / f"{kind}--{repo.replace('/', '--')}" / "snapshots"
    (commit,) = list(snapshots.iterdir())
    return commit


# -- names ------------------------------------------------------------------------------------------------
def test_hub_ids_and_revisions_parse() -> None:
    assert hub.parse_model_id("Qwen/Qwen2.5-0.5B-Instruct") == hub.HubRef("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub.parse_model_id("org/m@v1.0").revision == "v1.0"
    assert hub.parse_model_id("gpt2") == hub.HubRef("gpt2")
    for not_an_id in ("a/b/c", "./m", "/abs/path", "org/m@", "~/m"):
        assert hub.parse_model_id(not_an_id) is None, not_an_id
    ref = hub.parse_dataset_id("hub://org/data@abc/sub/train.jsonl")
    assert (ref.repo_id, ref.revision, ref.repo_type, ref.path) == (
        "org/data",
        "abc",
        "dataset",
        "sub/train.jsonl",
    )
    assert str(ref) == "hub://org/data@abc/sub/train.jsonl"
    with pytest.raises(LitPeftError, match="hub://org/name"):
        hub.parse_dataset_id("hub://justone")


# -- models -----------------------------------------------------------------------------------------------
def test_first_use_downloads_only_what_a_causal_lm_needs(server: HubServer) -> None:
    tok = load_tokenizer("org/tiny")
    model = load_model("org/tiny", tokenizer=tok)
    reference = load_model("tiny:llama")
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(x).logits, reference(x).logits)
    fetched = sorted(str(p.relative_to(_snapshot("org/tiny"))) for p in _snapshot("org/tiny").rglob("*"))
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    for never in ("pytorch_model.bin", "flax_model.msgpack", "onnx", "modeling_x.py", "README.md"):
        assert never not in fetched
    assert not server.requested(r"/resolve/.*(pytorch_model|\.py|onnx|msgpack)")


def test_cache_hit_with_the_server_stopped_and_offline(
    server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(LitPeftError, match=r"HF_HUB_OFFLINE=1; run `litpeft download org/tiny` while online"):
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        load_tokenizer("org/tiny")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    load_tokenizer("org/tiny")
    pinned = pinned_spec("org/tiny")
    assert pinned == f"org/tiny@{_snapshot('org/tiny').name}"
    server.stop()
    assert load_tokenizer(pinned)("ab").input_ids  # a commit pin needs no request at all
    with pytest.raises(LitPeftError, match="cannot reach the hub .* not in the cache"):
        load_tokenizer("org/gated")  # not cached and unreachable
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    n = len(server.log)
    assert load_model("org/tiny") is not None
    assert len(server.log) == n


def test_unknown_repo_gated_repo_and_unknown_revision_fail_in_one_line(
    server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(LitPeftError, match=r"model 'org/nope' not found on the hub .*HF_ENDPOINT"):
        load_tokenizer("org/nope")
    with pytest.raises(LitPeftError, match="model 'org/gated' is gated: .*set HF_TOKEN"):
        load_tokenizer("org/gated")
    with pytest.raises(LitPeftError, match=r"model 'org/private': access denied .*HTTP 401.*set HF_TOKEN"):
        load_tokenizer("org/private")
    with pytest.raises(LitPeftError, match="revision 'v9' of model 'org/tiny@v9' not found"):
        load_tokenizer("org/tiny@v9")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert load_tokenizer("org/gated")("ab").input_ids and load_tokenizer("org/private")("ab").input_ids


def test_revision_pin_loads_that_commit(
    server: HubServer, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    repo = server.models["org/tiny"]
    old = repo.refs["main"]
    repo.refs["v1"] = old
    new = repo.add_commit(_other_weights(tiny_files, tmp_path / "other"))
    x = torch.tensor([[1, 2, 3]])
    latest, tagged, by_commit = (
        load_model(s)(x).logits for s in ("org/tiny", "org/tiny@v1", f"org/tiny@{old}")
    )
    assert torch.equal(tagged, by_commit) and not torch.equal(latest, tagged)
    assert pinned_spec("org/tiny") == f"org/tiny@{new}" and pinned_spec("org/tiny@v1") == f"org/tiny@{old}"


def test_an_interrupted_download_resumes(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    server.drop_once.add("model.safetensors")
    model = load_model("org/tiny")
    gets = [r for r in server.requested(r"/cdn/.*/model\.safetensors$") if r[0] == "GET"]
    assert len(gets) == 2 and gets[0][2] is None and gets[1][2].startswith("bytes=")
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(x).logits, load_model("tiny:llama")(x).logits)


def test_a_download_cut_off_for_good_keeps_finished_files_for_the_next_run(
    server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """huggingface_hub resumes a dropped file inside one call; across runs it keeps every finished file
    (its partial files are per process and removed), so a rerun fetches only what is missing."""
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    load_model("tiny:llama").save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    files = dir_files(tmp_path / "sharded")
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    assert len(shards) >= 3
    server.models["org/sharded"] = Repo.from_files({**files, **dir_files(_tokenizer_dir(tmp_path))})
    server.cut[shards[1]] = len(files[shards[1]]) // 2

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "org/sharded"])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("litpeft: error:")]
    assert exit_info.value.code == 2 and len(err) == 1 and "Traceback" not in stderr
    assert err[0].startswith("litpeft: error: downloading model 'org/sharded' from ")
    assert err[0].endswith("run it again: files already downloaded are kept")
    blobs = Path(hf_constants.HF_HUB_CACHE) / "models--org--sharded" / "blobs"
    assert not list(blobs.glob("*.incomplete"))  # no partial file left behind

    def gets(name: str) -> int:
        return sum(1 for r in server.requested(rf"/cdn/.*/{name}$") if r[0] == "GET")

    before = {name: gets(name) for name in shards}
    assert all(before[name] == 1 for name in shards if name != shards[1])  # the others finished
    del server.cut[shards[1]]
    main(["download", "org/sharded"])
    assert {name: gets(name) - before[name] for name in shards} == {
        name: int(name == shards[1]) for name in shards
    }
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model("org/sharded")(x).logits, load_model("tiny:llama")(x).logits)


def _tokenizer_dir(tmp_path: Path) -> Path:
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_ranks_downloading_at_once_fetch_each_file_once(server: HubServer, tmp_path: Path) -> None:
    """Every DDP rank loads the model: processes sharing a cache download each file once (huggingface_hub's
    per-file lock) and all of them get the model; the server holds the weights until both ask for them."""
    server.hold["model.safetensors"] = 2
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "litpeft", "download", "org/tiny"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len([r for r in server.requested(r"/resolve/\w+/model\.safetensors$") if r[0] == "HEAD"]) >= 2
    assert len([r for r in server.requested(r"/cdn/.*/model\.safetensors$") if r[0] == "GET"]) == 1
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model("org/tiny")(x).logits, load_model("tiny:llama")(x).logits)


def test_repo_code_is_never_fetched_or_run_without_trust_remote_code(
    server: HubServer, tmp_path: Path
) -> None:
    with pytest.raises(LitPeftError, match="trust_remote_code"):
        load_model("org/evil")
    assert not (_snapshot("org/evil") / "modeling_x.py").exists()
    assert not (tmp_path / "code-ran").exists()


# -- the download command ----------------------------------------------------------------------------------
def test_download_command(server: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    main(["download", "org/tiny"])
    out = capsys.readouterr().out
    assert f"model 'org/tiny' (commit {_snapshot('org/tiny').name}) is in {_snapshot('org/tiny')}" in out
    assert (_snapshot("org/tiny") / "model.safetensors").is_file()
    main(["download", "hub://org/words", "--revision", "main"])
    assert (_snapshot("org/words", "datasets") / "data" / "train.jsonl").is_file()
    main(["download", "org/tiny", "--include", "README.md"])
    main(["download", "org/tiny", "--include", '["modeling_x.py", "*.msgpack"]'])
    for extra in ("README.md", "modeling_x.py", "flax_model.msgpack"):
        assert (_snapshot("org/tiny") / extra).is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "org/nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("litpeft: error: model 'org/nope' not found on the hub") and "\n" not in err


# -- datasets ---------------------------------------------------------------------------------------------
def test_hub_datasets_read_like_local_files(server: HubServer) -> None:
    train = AutoSource().load("hub://org/words")
    test = AutoSource(val_split="test").load("hub://org/words", "val")
    assert (len(train.samples), len(test.samples)) == (20, 4)
    assert train.samples[0][-1] == {"role": "assistant", "content": "elppa"}
    one_file = AutoSource().load("hub://org/words/data/test.jsonl")
    assert one_file.samples == test.samples and one_file.locations[0].endswith("data/test.jsonl:1")
    conversations = read_conversations("hub://org/words/data/test.jsonl", need_reference=True)
    assert [m for _, m in conversations] == test.samples
    mapped = Alpaca(column_map={"instruction": "q", "output": "a"}).load("hub://org/dolly@main")
    assert mapped.samples[0][0]["content"] == "apple"
    with pytest.raises(LitPeftError, match="split 'validation'.*val_split"):
        AutoSource().load("hub://org/words", "val")
    with pytest.raises(LitPeftError, match="dataset 'hub://org/none' not found on the hub"):
        AutoSource().load("hub://org/none")


def test_fit_a_hub_model_on_a_hub_dataset_then_generate_offline(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {
        "model": {"init_args": {"model": "org/tiny"}},
        "data": {
            "init_args": {
                "train_file": "hub://org/words",
                "val_file": "hub://org/words",
                "source": {"class_path": "litpeft.data.AutoSource", "init_args": {"val_split": "test"}},
                "batch_size": 4,
                "max_seq_length": 64,
            }
        },
        "trainer": {
            "max_steps": 2,
            "precision": "32-true",
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            "logger": False,
        },
    }
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(
        "fit",
        "--config",
        str(tmp_path / "hub.yaml"),
        "--model.init_args.adapter_dir",
        "adapter",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = yaml.safe_load((tmp_path / "adapter" / "adapter.yaml").read_text())
    assert meta["base_model"] == f"org/tiny@{_snapshot('org/tiny').name}"
    server.stop()  # the pinned base comes from the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli(
        "generate", "--adapter", "adapter", "--prompt", "apple", "--max_new_tokens", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_repo_without_safetensors_falls_back_to_pickled_weights(
    server: HubServer, tiny_files: dict[str, bytes], tmp_path: Path
) -> None:
    reference = load_model("tiny:llama")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    files = {k: v for k, v in tiny_files.items() if not k.endswith(".safetensors")}
    server.models["org/old"] = Repo.from_files(
        {**files, "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()}
    )
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model("org/old")(x).logits, reference(x).logits)
    assert not (_snapshot("org/old") / "flax_model.msgpack").exists()


def test_an_adapter_records_the_commit_and_exports_it(server: HubServer, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "org/tiny", LoRA(r=2))
    commit = _snapshot("org/tiny").name
    assert yaml.safe_load((adapter / "adapter.yaml").read_text())["base_model"] == f"org/tiny@{commit}"
    main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", commit)


@pytest.mark.integration
def test_smollm2_served_by_the_stand_in_loads_by_hub_id(
    server: HubServer, monkeypatch: pytest.MonkeyPatch, smollm2: str
) -> None:
    """The real SmolLM2-135M-Instruct files (converted from the bundled GGUF) fetched by hub id."""
    if USER_CACHE:  # the converted model lives in the user's litpeft cache, not the test's
        monkeypatch.setenv("LITPEFT_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("LITPEFT_CACHE")
    local = Path(resolve_spec(smollm2))
    server.models["HuggingFaceTB/SmolLM2-135M-Instruct"] = Repo.from_files(dir_files(local))
    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    model = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer=tok)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(model(x).logits, load_model(smollm2)(x).logits)
    assert tok.chat_template == load_tokenizer(smollm2).chat_template
