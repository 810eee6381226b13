#!/usr/bin/env python3
"""Generate the bundled demo instruction dataset used by ``make demo``.

Task: **date normalization**.  Each row gives a calendar date written in one of
several human styles and asks for the same date in ISO 8601 form::

    instruction: Convert the date to ISO format (YYYY-MM-DD). Reply with the date only.
    input:       Friday, the 5th of March 2021
    output:      2021-03-05

Input styles mix full and abbreviated month names, ordinal and cardinal days,
day-first and month-first ordering, optional weekday prefixes (a distractor
that must be ignored) and zero-padded ``DD-Mon-YYYY`` forms.

Why this task:

* It is a deterministic rule with a single correct, short answer (10
  characters), so greedy-decoding exact match is an unambiguous metric.
* It needs a small real skill rather than pure copying: mapping month names
  and abbreviations to numbers, stripping ordinal suffixes, zero-padding the
  day and month, and reordering the fields.
* SmolLM2-135M-Instruct cannot do it zero-shot with the strict output format
  (it answers verbosely, mis-maps months or forgets padding), but a LoRA
  adapter learns it in roughly a hundred or two optimizer steps on CPU.
* Rows are short (about 50-60 tokens with the chat template), which keeps
  CPU training fast.
* The validation split is drawn from calendar dates that never appear in the
  training split (in any style), so the tuned score measures generalization
  of the rule, not memorization.

Only the standard library is used and the output is fully determined by
``--seed``, ``--n-train`` and ``--n-val``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Convert the date to ISO format (YYYY-MM-DD). Reply with the date only."

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

FIRST_DATE = dt.date(1950, 1, 1)
LAST_DATE = dt.date(2049, 12, 31)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def render(date: dt.date, style: int) -> str:
    """Render ``date`` in one of the human-readable input styles."""
    month = MONTHS[date.month - 1]
    mon = month[:3]
    day, year = date.day, date.year
    weekday = WEEKDAYS[date.weekday()]
    styles = [
        f"{month} {day}, {year}",  # March 5, 2021
        f"{day} {month} {year}",  # 5 March 2021
        f"{mon} {day}, {year}",  # Mar 5, 2021
        f"{month} {ordinal(day)}, {year}",  # March 5th, 2021
        f"the {ordinal(day)} of {month}, {year}",  # the 5th of March, 2021
        f"{day:02d}-{mon}-{year}",  # 05-Mar-2021
        f"{weekday}, {month} {day}, {year}",  # Friday, March 5, 2021
        f"{weekday}, the {ordinal(day)} of {month} {year}",  # Friday, the 5th of March 2021
        f"{day} {mon} {year}",  # 5 Mar 2021
        f"{year}, {month} {day}",  # 2021, March 5
    ]
    return styles[style % len(styles)]


N_STYLES = 10


def make_rows(dates: list[dt.date], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i, date in enumerate(dates):
        # Cycle through the styles (shuffled order per cycle) so every style
        # is represented evenly even in small splits.
        if i % N_STYLES == 0:
            order = list(range(N_STYLES))
            rng.shuffle(order)
        style = order[i % N_STYLES]
        rows.append(
            {
                "instruction": INSTRUCTION,
                "input": render(date, style),
                "output": date.isoformat(),
            }
        )
    rng.shuffle(rows)
    return rows


def build(n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    span = (LAST_DATE - FIRST_DATE).days + 1
    if n_train + n_val > span:
        raise ValueError(f"at most {span} rows can be generated")
    rng = random.Random(seed)
    offsets = rng.sample(range(span), n_train + n_val)
    dates = [FIRST_DATE + dt.timedelta(days=o) for o in offsets]
    # Disjoint calendar dates: validation dates never occur in training.
    val_dates, train_dates = dates[:n_val], dates[n_val:]
    val = make_rows(val_dates, rng)
    train = make_rows(train_dates, rng)
    assert not {r["output"] for r in val} & {r["output"] for r in train}
    return train, val


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="litpeft/data/demo", help="output directory")
    parser.add_argument("--n-train", type=int, default=2000, help="training rows")
    parser.add_argument("--n-val", type=int, default=100, help="validation rows")
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    args = parser.parse_args(argv)

    train, val = build(args.n_train, args.n_val, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} val rows to {out}")


if __name__ == "__main__":
    main()
