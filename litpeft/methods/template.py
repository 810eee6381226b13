"""Where virtual tokens go: P-tuning's template, and the layout of the extended sequence row by row.

A template is a list of blocks (:class:`PromptBlock`, plain dicts in YAML). Each block puts ``tokens``
virtual tokens (the next ones of the ``N``, in template order) and then the ``anchor`` text (real tokens,
frozen embeddings: the paper's task-related anchors, e.g. ``"?"``) at one point of every sample: its
start, or right ``after`` / right ``before`` an occurrence of a text of the prompt style (e.g. Alpaca's
``"### Response:\\n"``, ChatML's ``"<|im_start|>assistant\\n"``). This is P-tuning's
``[P_0:i] x [P_i+1:j] y ...`` (Liu et al. 2021, arXiv 2103.10385, sec. 3.2) against the style's parts.

:func:`layout` finds the samples of each row (the real tokens, split where the position ids restart: a
packed row holds several), places every block in every sample, and numbers each sample's extended
sequence from its first position, so a packed sample or a padded row sees exactly what it sees alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch

from litpeft.errors import LitPeftError


class PromptBlock(TypedDict, total=False):
    """One block of a P-tuning template (a YAML mapping; every key optional).

    Keys: ``tokens`` (virtual tokens, default 0), ``anchor`` (text kept as real tokens after them),
    ``after`` / ``before`` (the block goes right after / before this text; neither: at the sample's
    start), ``occurrence`` (``every`` (default), ``first`` or ``last`` occurrence of that text) and
    ``required`` (default true: a sample without the text is an error; false: the block is left out).
    """

    tokens: int
    anchor: str
    after: str
    before: str
    occurrence: Literal["every", "first", "last"]
    required: bool


BLOCK_KEYS = set(PromptBlock.__annotations__)


@dataclass(frozen=True)
class Block:
    """A block with its texts tokenized: ``virtual`` and ``anchor`` are ``[start, stop)`` ranges into the
    ``N`` virtual tokens and into all anchors' ids; an empty ``marker`` means the sample's start."""

    virtual: tuple[int, int]
    anchor: tuple[int, int] = (0, 0)
    marker: tuple[int, ...] = ()
    after: bool = True
    occurrence: str = "every"
    required: bool = True
    label: str = ""  # names the block in errors


def check_template(template: list[PromptBlock], num_virtual_tokens: int) -> None:
    """Refuse a malformed template with one line."""
    if not template:
        raise LitPeftError("placement='template' needs a non-empty template (a list of blocks)")
    total = 0
    for i, block in enumerate(template):
        if not isinstance(block, dict) or set(block) - BLOCK_KEYS:
            raise LitPeftError(
                f"template block {i} must be a mapping with keys among {sorted(BLOCK_KEYS)}, got {block!r}"
            )
        tokens = block.get("tokens", 0)
        if not isinstance(tokens, int) or tokens < 0:
            raise LitPeftError(f"template block {i}: tokens must be a non-negative integer, got {tokens!r}")
        if not tokens and not block.get("anchor"):
            raise LitPeftError(f"template block {i} inserts nothing: give it tokens or an anchor")
        if block.get("after") is not None and block.get("before") is not None:
            raise LitPeftError(f"template block {i}: give after or before, not both")
        if block.get("occurrence", "every") not in ("every", "first", "last"):
            raise LitPeftError(f"template block {i}: occurrence must be every, first or last")
        total += tokens
    if total != num_virtual_tokens:
        raise LitPeftError(
            f"the template holds {total} virtual tokens but num_virtual_tokens is {num_virtual_tokens}; "
            f"set num_virtual_tokens: {total}"
        )


def is_prefix(blocks: list[Block]) -> bool:
    """Whether the blocks are all virtual tokens before the input (prompt tuning's layout)."""
    return all(not b.marker and b.anchor[0] == b.anchor[1] for b in blocks)


@dataclass(frozen=True)
class Layout:
    """The extended batch: ``order`` ``(B, E)`` indexes ``cat([real (L), virtual (N), anchors (A), pad])``;
    ``real_index`` ``(B, L)`` is where each real token went; ``shift`` ``(B,)`` is how many tokens were
    inserted into each row's last sample (what later tokens of a cached generation are shifted by)."""

    order: torch.Tensor
    real_index: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    shift: torch.Tensor


def _samples(real: list[int], pos: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of real tokens whose positions count up by one."""
    out: list[tuple[int, int]] = []
    start = None
    for j, keep in enumerate(real):
        if not keep:
            if start is not None:
                out.append((start, j))
            start = None
        elif start is None:
            start = j
        elif pos[j] - pos[j - 1] != 1:
            out.append((start, j))
            start = j
    if start is not None:
        out.append((start, len(real)))
    return out


def _occurrences(ids: list[int], marker: tuple[int, ...]) -> list[int]:
    m, first = len(marker), marker[0]
    return [s for s in range(len(ids) - m + 1) if ids[s] == first and tuple(ids[s : s + m]) == marker]


def _insertions(blocks: list[Block], ids: list[int], sources: list[list[int]]) -> dict[int, list[int]]:
    """Offset in the sample -> the source indices inserted there, in template order."""
    out: dict[int, list[int]] = defaultdict(list)
    for block, src in zip(blocks, sources, strict=True):
        if not block.marker:
            points = [0]
        else:
            hits = _occurrences(ids, block.marker)
            if not hits and block.required:
                raise LitPeftError(
                    f"{block.label} (token ids {list(block.marker)}) not found in every sequence of the batch"
                )
            hits = (
                hits[:1] if block.occurrence == "first" else hits[-1:] if block.occurrence == "last" else hits
            )
            points = [h + len(block.marker) if block.after else h for h in hits]
        for p in points:
            out[p] += src
    return out


def layout(
    blocks: list[Block],
    num_virtual: int,
    input_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    batch: int,
    length: int,
    max_positions: int,
    device: torch.device,
) -> Layout:
    """Place ``blocks`` in every sample of every row (see the module docstring).

    A sample is a run of real tokens (``mask``) whose ``positions`` count up by one; its extended
    sequence is numbered from its first token's position. Tokens outside samples (padding) keep their
    position. Rows that end up shorter are padded at the end: masked out where there is a mask (one is
    made when there is neither mask nor position ids), else continuing the last sample's positions
    (after every real token, so causal attention never lets a real token see them).
    """
    n_anchor = max((b.anchor[1] for b in blocks), default=0)
    pad_src = length + num_virtual + n_anchor
    sources = [
        list(range(length + b.virtual[0], length + b.virtual[1]))
        + list(range(length + num_virtual + b.anchor[0], length + num_virtual + b.anchor[1]))
        for b in blocks
    ]
    needs_ids = any(b.marker for b in blocks)
    if needs_ids and input_ids is None:
        raise LitPeftError("a P-tuning template with texts needs input_ids, not inputs_embeds")
    ids_rows = input_ids.tolist() if needs_ids else None
    real_rows = mask.tolist() if mask is not None else [[1] * length] * batch
    pos_rows = (
        positions.expand(batch, -1).tolist() if positions is not None else [list(range(length))] * batch
    )
    rows = []
    for r in range(batch):
        real, pos = real_rows[r], pos_rows[r]
        src, ext_pos, ext_mask, real_at = [], [], [], [0] * length
        shift, j, counter = 0, 0, 0
        for start, stop in _samples(real, pos):
            while j < start:  # padding before the sample
                real_at[j] = len(src)
                src.append(j), ext_pos.append(pos[j]), ext_mask.append(0)
                j += 1
            ins = _insertions(blocks, ids_rows[r][start:stop] if ids_rows else [], sources)
            counter, shift = pos[start], 0
            for k in range(start, stop + 1):
                for s in ins.get(k - start, ()):
                    src.append(s), ext_pos.append(counter), ext_mask.append(1)
                    counter, shift = counter + 1, shift + 1
                if k < stop:
                    real_at[k] = len(src)
                    src.append(k), ext_pos.append(counter), ext_mask.append(1)
                    counter += 1
            j = stop
        for k in range(j, length):  # padding after the last sample
            real_at[k] = len(src)
            src.append(k), ext_pos.append(pos[k]), ext_mask.append(0)
        rows.append((src, ext_pos, ext_mask, real_at, shift, counter))
    width = max(len(row[0]) for row in rows)
    uneven = any(len(row[0]) != width for row in rows)
    masked = mask is not None or (uneven and positions is None)
    top = max((p + 1 for row in rows for p, m in zip(row[1], row[2], strict=True) if m), default=0)
    if top > max_positions:
        raise LitPeftError(
            f"num_virtual_tokens={num_virtual} (and anchors) take a sample to position {top}, past the "
            f"model's context of {max_positions} positions"
        )
    for src, ext_pos, ext_mask, _, _, counter in rows:
        extra = width - len(src)
        src += [pad_src] * extra
        ext_mask += [0] * extra
        ext_pos += [0] * extra if masked else [min(counter + i, max_positions - 1) for i in range(extra)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Layout(
        order=as_tensor([row[0] for row in rows]),
        real_index=as_tensor([row[3] for row in rows]),
        positions=as_tensor([row[1] for row in rows]),
        mask=as_tensor([row[2] for row in rows]).to(mask.dtype if mask is not None else torch.long)
        if masked
        else None,
        shift=as_tensor([row[4] for row in rows]),
    )
