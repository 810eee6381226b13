#!/usr/bin/env python3
"""Generate the bundled demo preference set (``configs/dpo.yaml``, ``scripts/preference_demo.py``).

Task: the same date, two formats. The prompt asks for a date "in digits" without naming a format; the
chosen answer is ISO 8601, the rejected one the same date in another numeric format::

    prompt:   Write this date in digits: the 5th of March, 2021
    chosen:   2021-03-05
    rejected: 03/05/2021

So the pair differs only in format, never in content: what preference tuning has to learn is "answer in
the required format". The input dates use the styles of the SFT demo (``scripts/make_demo_data.py``); the
validation split's calendar dates never occur in training. Standard library only; the output is fully
determined by ``--seed``, ``--n-train`` and ``--n-val``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import FIRST_DATE, LAST_DATE, N_STYLES, render, write_jsonl  # noqa: E402

PROMPT = "Write this date in digits: {date}"
#: the rejected formats: US, European with dots, European with slashes, short year
OTHER_FORMATS = ("{m:02d}/{d:02d}/{y}", "{d:02d}.{m:02d}.{y}", "{d:02d}/{m:02d}/{y}", "{m}/{d}/{yy:02d}")


def other_format(date: dt.date, i: int) -> str:
    return OTHER_FORMATS[i % len(OTHER_FORMATS)].format(
        d=date.day, m=date.month, y=date.year, yy=date.year % 100
    )


def make_rows(dates: list[dt.date], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i, date in enumerate(dates):
        rows.append(
            {
                "prompt": PROMPT.format(date=render(date, rng.randrange(N_STYLES))),
                "chosen": date.isoformat(),
                "rejected": other_format(date, i),
            }
        )
    rng.shuffle(rows)
    return rows


def build(n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    offsets = rng.sample(range((LAST_DATE - FIRST_DATE).days + 1), n_train + n_val)
    dates = [FIRST_DATE + dt.timedelta(days=o) for o in offsets]
    return make_rows(dates[n_val:], rng), make_rows(dates[:n_val], rng)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="litpeft/data/demo", help="output directory")
    parser.add_argument("--n-train", type=int, default=400, help="training pairs")
    parser.add_argument("--n-val", type=int, default=60, help="validation pairs")
    parser.add_argument("--seed", type=int, default=4321, help="random seed")
    args = parser.parse_args(argv)
    train, val = build(args.n_train, args.n_val, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "preference_train.jsonl", train)
    write_jsonl(out / "preference_val.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} val pairs to {out}")


if __name__ == "__main__":
    main()
