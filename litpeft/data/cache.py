"""The on-disk cache of tokenized samples, so that a second ``fit`` on the same data does not re-tokenize.

A cache entry is one safetensors file under ``<litpeft cache>/data/``, named by a hash of everything the
tokens depend on: the samples as read from the data files (so, their content and the source's reading of
them), the tokenizer (vocabulary, merges, special tokens, chat template), the prompt style (name,
settings and code), ``train_on_inputs`` and the code of :func:`~litpeft.data.collate.encode_many`.
``max_seq_length`` and ``truncation`` are applied after the cache, so changing them costs nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from litpeft.data.collate import TokenizedSamples, encode_many
from litpeft.data.prompts import Message, PromptStyle
from litpeft.files import atomic_path, cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


def data_cache_dir() -> Path:
    return cache_dir() / "data"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides how a tokenizer turns text into ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(repr(tokenizer.added_tokens_decoder).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


def cache_key(
    samples: Sequence[list[Message]],
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    train_on_inputs: bool,
) -> str:
    h = hashlib.sha256(f"litpeft-data-{CACHE_VERSION}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(style.fingerprint().encode())
    h.update(inspect.getsource(encode_many).encode())
    h.update(b"train_on_inputs=1" if train_on_inputs else b"train_on_inputs=0")
    for messages in samples:
        h.update(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return data_cache_dir() / f"{key}.safetensors"


def load(key: str) -> TokenizedSamples | None:
    """The cached samples under ``key``, or ``None`` (missing or unreadable: then they are rebuilt)."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        return TokenizedSamples(t["input_ids"], t["labels"], t["offsets"])
    except (SafetensorError, OSError, KeyError) as e:
        log.warning("ignoring unreadable tokenization cache %s (%s)", path, e)
        return None


def save(key: str, data: TokenizedSamples) -> Path:
    """Write atomically: a concurrent reader sees the old file or the complete new one."""
    path = cache_path(key)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in data.tensors().items()}, str(tmp))
    return path
