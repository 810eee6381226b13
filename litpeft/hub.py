"""Hugging Face hub repositories, downloaded on first use into the standard Hugging Face cache.

A model is named by its repo id, optionally pinned to a branch, tag or commit with ``@``::

    model: Qwen/Qwen2.5-0.5B-Instruct
    model: Qwen/Qwen2.5-0.5B-Instruct@7ae557604adf67be50417f59c2c2f167def9a775

A dataset is named ``hub://org/name[@revision][/path/in/repo]``. The usual Hugging Face settings apply:
``HF_TOKEN`` (private and gated repos), ``HF_ENDPOINT`` (another hub or a mirror), ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is) and ``HF_HUB_OFFLINE=1`` (the cache only). Only the files a causal LM
needs are fetched (:data:`MODEL_FILES`); the repo's own code (``*.py``) only with ``trust_remote_code``.
Every failure is one :class:`LitPeftError` line that names the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from litpeft.errors import LitPeftError

DATASET_PREFIX = "hub://"

#: What a causal LM needs: config, generation config, tokenizer files and safetensors weights.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "model*.safetensors",
    "model.safetensors.index.json",
]
#: Pickled weights, fetched only from a repo without safetensors (transformers loads them weights-only).
PICKLED_WEIGHTS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
#: The repo's own code, fetched only with ``trust_remote_code``.
REMOTE_CODE = ["*.py"]

_MODEL_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)(@(?P<revision>[\w.][\w./-]*))?")


@dataclass(frozen=True)
class HubRef:
    """A repository on the hub, an optional revision (branch, tag or commit) and path inside it."""

    repo_id: str
    revision: str | None = None
    repo_type: Literal["model", "dataset"] = "model"
    path: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        text += f"/{self.path}" if self.path else ""
        return DATASET_PREFIX + text if self.repo_type == "dataset" else text

    @property
    def what(self) -> str:
        return f"{self.repo_type} '{self}'"


def parse_model_id(spec: str) -> HubRef | None:
    """``org/name[@revision]`` as a :class:`HubRef`; ``None`` when ``spec`` is not shaped like a repo id."""
    match = _MODEL_ID.fullmatch(spec)
    return HubRef(match["repo"], match["revision"]) if match else None


def is_hub_dataset(path: object) -> bool:
    """Whether a data path names a hub dataset (``hub://org/name...``)."""
    return isinstance(path, str) and path.startswith(DATASET_PREFIX)


def parse_dataset_id(path: str) -> HubRef:
    """``hub://org/name[@revision][/path/in/repo]`` as a :class:`HubRef`."""
    parts = path[len(DATASET_PREFIX) :].strip("/").split("/")
    ref = parse_model_id("/".join(parts[:2])) if len(parts) >= 2 else None
    if ref is None:
        raise LitPeftError(f"'{path}' is not a hub dataset; write hub://org/name[@revision][/path/in/repo]")
    return HubRef(ref.repo_id, ref.revision, "dataset", "/".join(parts[2:]) or None)


def parse_ref(repo_id: str, revision: str | None = None) -> HubRef:
    """``org/name[@rev]`` (a model) or ``hub://org/name[@rev]`` (a dataset), with ``revision`` given apart."""
    if is_hub_dataset(repo_id):
        ref = parse_dataset_id(repo_id)
    else:
        parsed = parse_model_id(repo_id)
        if parsed is None:
            raise LitPeftError(f"'{repo_id}' is not a hub id; write org/name (a model) or hub://org/name")
        ref = parsed
    if revision is None:
        return ref
    if ref.revision is not None and ref.revision != revision:
        raise LitPeftError(f"'{repo_id}' names revision '{ref.revision}' but --revision is '{revision}'")
    return replace(ref, revision=revision)


def dataset_patterns(ref: HubRef, whole_repo: list[str]) -> list[str]:
    """The files of a dataset ``ref`` to fetch: its path (a file or folder) or, for the repo, ``whole_repo``."""
    return [ref.path, f"{ref.path}/*"] if ref.path else list(whole_repo)


def offline() -> bool:
    """``HF_HUB_OFFLINE=1``: use the cache only (huggingface_hub reads it when it is imported)."""
    return bool(constants.HF_HUB_OFFLINE)


def download(ref: HubRef, patterns: list[str]) -> Path:
    """The local snapshot directory of ``ref`` holding the files that match ``patterns``.

    Files already in the cache are not fetched again; with ``HF_HUB_OFFLINE=1`` nothing is fetched.
    """
    try:
        return Path(
            snapshot_download(
                ref.repo_id,
                repo_type=ref.repo_type,
                revision=ref.revision,
                allow_patterns=patterns,
            )
        )
    except Exception as e:  # huggingface_hub and its HTTP client raise many types
        message = hub_error(ref, e)
        if message is None:
            raise
        raise LitPeftError(message) from e


def download_model(ref: HubRef, trust_remote_code: bool = False, include: list[str] | None = None) -> Path:
    """The local snapshot of a causal LM: :data:`MODEL_FILES` (or ``include``), plus pickled weights
    only when the repo has no safetensors, plus its code only with ``trust_remote_code``."""
    patterns = list(include or MODEL_FILES) + (REMOTE_CODE if trust_remote_code else [])
    path = download(ref, patterns)
    if include is None and not any(path.glob("*.safetensors")):
        path = download(ref, patterns + PICKLED_WEIGHTS)
    return path


def cached_commit(ref: HubRef, filename: str = "config.json") -> str | None:
    """The commit of ``ref`` in the local cache (whose snapshot holds ``filename``), or ``None``."""
    path = try_to_load_from_cache(ref.repo_id, filename, revision=ref.revision, repo_type=ref.repo_type)
    return Path(path).parent.name if isinstance(path, str) else None


def hub_error(ref: HubRef, error: BaseException) -> str | None:
    """One line saying what went wrong with ``ref`` and how to fix it; ``None`` for an unexpected error."""
    endpoint = constants.ENDPOINT
    get = f"run `litpeft download {ref}` while online"
    if isinstance(error, GatedRepoError):
        return (
            f"{ref.what} is gated: accept its terms on {endpoint}/{ref.repo_id}, then set HF_TOKEN to a "
            "token of that account"
        )
    if isinstance(error, RepositoryNotFoundError) or (
        isinstance(error, HfHubHTTPError) and _status(error) in (401, 403)
    ):
        if _status(error) in (401, 403):
            return (
                f"{ref.what}: access denied by the hub (HTTP {_status(error)}); it is private or gated: set "
                "HF_TOKEN to a token that can read it"
            )
        return (
            f"{ref.what} not found on the hub at {endpoint} (check the id; a private repo needs HF_TOKEN; "
            "set HF_ENDPOINT for another hub or mirror)"
        )
    if isinstance(error, RevisionNotFoundError):
        return (
            f"revision '{ref.revision}' of {ref.what} not found on the hub (check the branch, tag or commit)"
        )
    if isinstance(error, (LocalEntryNotFoundError, IncompleteSnapshotError)):
        where = "is incomplete in" if isinstance(error, IncompleteSnapshotError) else "is not in"
        if offline():
            return f"{ref.what} {where} the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1; {get}"
        return (
            f"cannot reach the hub at {endpoint} and {ref.what} {where} the cache ({constants.HF_HUB_CACHE}); "
            "check the network (or HF_ENDPOINT), or " + get
        )
    if isinstance(error, (ConnectionError, TimeoutError)) or _is_transport_error(error):
        return f"downloading {ref.what} from {endpoint} failed ({_first_line(error)}); run it again: files already downloaded are kept"
    if isinstance(error, HfHubHTTPError):
        return f"the hub at {endpoint} answered HTTP {_status(error)} for {ref.what}: {_first_line(error)}"
    return None


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transport_error(error: BaseException) -> bool:
    """A connection dropped or timed out inside huggingface_hub's HTTP client (httpx or its fork)."""
    return (
        type(error).__module__.split(".")[0] in ("httpx", "httpx2") and "Status" not in type(error).__name__
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


__all__ = [
    "DATASET_PREFIX",
    "MODEL_FILES",
    "HubRef",
    "cached_commit",
    "download",
    "dataset_patterns",
    "download_model",
    "hub_error",
    "is_hub_dataset",
    "offline",
    "parse_dataset_id",
    "parse_model_id",
]
