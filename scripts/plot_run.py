#!/usr/bin/env python3
"""Curves of one run, read from its TensorBoard event files, drawn as a PNG (README's "Watching a run").

    python scripts/plot_run.py runs/demo/lightning_logs/version_0 docs/watch_run.png

Not a screenshot of TensorBoard's page: the same scalars TensorBoard shows, read with its own
``EventAccumulator`` and drawn with Pillow (matplotlib is not a litpeft dependency).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

#: panel title -> (tag, colour) of each curve
PANELS = {
    "train/loss": [("train/loss", "#792ee5")],
    "tokens/s: all (purple), carrying loss (orange)": [
        ("perf/tokens_per_sec", "#792ee5"),
        ("perf/loss_tokens_per_sec", "#ff9d00"),
    ],
    "peak memory, GB (CPU: process RSS; GPU: CUDA allocated)": [
        ("perf/peak_rss_gb", "#792ee5"),
        ("perf/peak_cuda_memory_gb", "#ff9d00"),
    ],
}
W, H, PAD = 420, 300, 48


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def panel(title: str, curves: list[tuple[list[tuple[int, float]], str]]) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((PAD, 10), title, fill="black", font=font)
    points = [p for c, _ in curves for p in c]
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))
    left, top, right, bottom = PAD, 30, W - 12, H - 30

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (step - x0) / ((x1 - x0) or 1) * (right - left)
        return x, bottom - (value - y0) / (y1 - y0) * (bottom - top)

    d.rectangle((left, top, right, bottom), outline="#999999")
    for i in range(5):  # value grid and labels
        v = y0 + i * (y1 - y0) / 4
        _, y = xy(x0, v)
        d.line((left, y, right, y), fill="#eeeeee")
        d.text((4, y - 6), f"{v:.3g}", fill="#444444", font=font)
    for s in (x0, (x0 + x1) // 2, x1):
        x, _ = xy(s, y0)
        d.text((x - 8, bottom + 6), str(s), fill="#444444", font=font)
    d.text((right - 60, bottom + 16), "step", fill="#444444", font=font)
    for c, colour in curves:
        d.line([xy(s, v) for s, v in c], fill=colour, width=2)
        for s, v in c:
            x, y = xy(s, v)
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with events.out.tfevents.* files")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    data = scalars(args.run)
    panels = []
    for title, tags in PANELS.items():
        curves = [(data[tag], colour) for tag, colour in tags if data.get(tag)]
        if curves:
            panels.append(panel(title, curves))
    out = Image.new("RGB", (W * len(panels), H), "white")
    for i, p in enumerate(panels):
        out.paste(p, (i * W, 0))
    out.save(args.out, optimize=True)
    print(f"{args.out}: {', '.join(sorted(t for t in data if t.startswith(('train/', 'perf/'))))}")


if __name__ == "__main__":
    main()
