"""The method x precision x data path x base x family matrix (issue #16).

Every cell trains ``tiny:<family>`` with one method through Lightning's ``Trainer`` and its real
precision plugin, as ``litpeft fit`` does (the method's shipped ``configs/<method>.yaml`` and its LR; a
sanity validation pass, then 3 steps), and checks all three data paths on the trained model
(``matrix_cells``): fp32 trainables and AdamW states that moved; the packed loss equals the padded one;
greedy generation of a left-padded batch with the KV cache equals it without; the adapter directory
reloads with the same logits; the peft export (fp32, plain base) gives the same logits in peft, or the
export is refused with one line. A cell a family cannot run asserts its one-line refusal instead.

Axes: 13 families (``litpeft.tiny``), 10 methods (the 8, plus DoRA and QLoRA = LoRA on nf4),
precisions {32-true, bf16-mixed, bf16-true}, bases {plain, nf4}. A cell takes ~0.5-1 s (one thread).

- fast (default), ~70 cells: ``llama3`` x every method x every precision (full), and every family x
  LoRA x every precision (full);
- slow (``-m slow``; in ``make test``), ~250 cells more:
  32-true: every family x every method (full: it carries the peft export check);
  bf16-mixed / bf16-true: every family x every method with one of the two, alternating over the
  (family, method) grid (pairwise: every (family, precision), (method, precision) and (family, method)
  pair is covered);
  nf4 base: ``llama3`` x every method x every precision (full), and every family x QLoRA with the
  precisions alternating.

Known defects are strict xfails (``expectations.py``): the test raises ``KnownDefect`` only when exactly
the known checks fail, so an unknown failure in the same cell still fails, and a fixed defect XPASSes,
which fails until its marker is removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from expectations import KnownDefect, known_failures, param, refusal
from matrix_cells import FAMILIES, METHODS, PRECISIONS, Cell, run_cell

FAST_FAMILY = "llama3"


def fast_cells() -> list[Cell]:
    cells = [Cell(FAST_FAMILY, m, p) for m in METHODS for p in PRECISIONS]
    return cells + [Cell(f, "lora", p) for f in FAMILIES if f != FAST_FAMILY for p in PRECISIONS]


def slow_cells() -> list[Cell]:
    fast = {c.id for c in fast_cells()}
    cells = []
    for i, family in enumerate(FAMILIES):
        for j, method in enumerate(METHODS):
            cells.append(Cell(family, method, "32-true"))
            cells.append(Cell(family, method, ("bf16-mixed", "bf16-true")[(i + j) % 2]))
    cells += [Cell(FAST_FAMILY, m, p, "nf4") for m in METHODS if m != "qlora" for p in PRECISIONS]
    cells += [Cell(f, "qlora", PRECISIONS[i % 3]) for i, f in enumerate(FAMILIES)]
    unique = {c.id: c for c in cells if c.id not in fast}
    return list(unique.values())


def check_cell(cell: Cell, tmp_path: Path) -> None:
    """Run ``cell``: its refusal, or its checks with only the known defects failing (then KnownDefect)."""
    out = run_cell(cell, tmp_path)
    _record(cell, out.refused, out.failures)
    expected = refusal(cell)
    if expected is not None:
        assert out.refused is not None and expected in out.refused, (
            out.refused or "trained: expected a refusal"
        )
        return
    assert out.refused is None, f"unexpected refusal: {out.refused}"
    known = known_failures(cell)
    unexpected = {k: v for k, v in out.failures.items() if k not in known}
    assert not unexpected, unexpected
    if out.failures:
        raise KnownDefect("; ".join(f"{k}: {v}" for k, v in out.failures.items()))


def _record(cell: Cell, refused: str | None, failures: dict[str, str]) -> None:
    """Append the cell's outcome to ``$LITPEFT_MATRIX_RESULTS`` (JSON lines) for the README table."""
    path = os.environ.get("LITPEFT_MATRIX_RESULTS")
    if path:
        row = {**cell.__dict__, "refused": refused, "failures": failures, "known": known_failures(cell)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("cell", [param(c) for c in fast_cells()])
def test_cell(cell: Cell, tmp_path: Path) -> None:
    check_cell(cell, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cell", [param(c) for c in slow_cells()])
def test_cell_slow(cell: Cell, tmp_path: Path) -> None:
    check_cell(cell, tmp_path)


def test_the_matrix_covers_every_pair() -> None:
    """Every (family, method), (family, precision) and (method, precision) pair is in some cell, and the
    nf4 base meets every method and every precision."""
    cells = fast_cells() + slow_cells()
    pairs = {(c.family, c.method) for c in cells}
    assert pairs == {(f, m) for f in FAMILIES for m in METHODS}
    assert {(c.family, c.precision) for c in cells} == {(f, p) for f in FAMILIES for p in PRECISIONS}
    assert {(c.method, c.precision) for c in cells} == {(m, p) for m in METHODS for p in PRECISIONS}
    nf4 = [c for c in cells if c.quantize]
    assert {c.method for c in nf4} == set(METHODS) and {c.precision for c in nf4} == set(PRECISIONS)
