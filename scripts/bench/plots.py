"""The charts of docs/benchmark.md: tokens/s as a PNG (matplotlib) and as a plain SVG (no library)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pairs(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(litpeft, peft) results of the same configuration, matched in run order."""
    out = []
    keys = ("method", "precision", "model", "data", "repeat", "table")
    for lit in results:
        if (
            lit["runner"] != "litpeft"
            or "error" in lit
            or lit.get("compile")
            or lit.get("quantize")
            or lit.get("ablate")
        ):
            continue
        for other in results:
            if other["runner"] == "peft" and "error" not in other and all(other[k] == lit[k] for k in keys):
                out.append((lit, other))
                break
    return out


def write_png(results: list[dict[str, Any]], path: Path) -> None:
    """litpeft against transformers + peft, tokens/s per configuration (needs matplotlib: ``litpeft[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no benchmark.png (the .svg is written)")
        return
    matched = pairs(results)
    if not matched:
        return
    labels = [
        f"{lit['method']} {lit['precision']} {lit['model'].split('-')[0]} {lit['data']}"
        + (f" #{lit['repeat'] + 1}" if lit["repeat"] else "")
        for lit, _ in matched
    ]
    y = range(len(matched))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(matched) + 1.4))
    ax.barh(
        [i - 0.2 for i in y],
        [lit["tokens_per_s"] for lit, _ in matched],
        0.4,
        label="litpeft",
        color="#792ee5",
    )
    ax.barh(
        [i + 0.2 for i in y],
        [o["tokens_per_s"] for _, o in matched],
        0.4,
        label="transformers + peft",
        color="#ff9d00",
    )
    for i, (lit, other) in enumerate(matched):
        ax.text(
            lit["tokens_per_s"] + 3,
            i - 0.2,
            f"{lit['tokens_per_s'] / other['tokens_per_s']:.2f}x",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s (real tokens), higher is better")
    ax.set_title("litpeft vs transformers + peft (ratio at litpeft's bar)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_svg(results: list[dict[str, Any]], path: Path) -> None:
    """A horizontal bar chart of tokens/s per configuration (plain SVG: no plotting library needed)."""
    rows = [
        r for r in results if "error" not in r and r["table"] in ("main", "precision", "shapes", "compile")
    ]
    if not rows:
        return
    colors = {"litpeft": "#792ee5", "peft": "#ff9d00", "trainer": "#999999"}
    bar_h, gap, left, width = 18, 6, 360, 420
    top = 40
    height = top + len(rows) * (bar_h + gap) + 30
    vmax = max(r["tokens_per_s"] for r in rows)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="10" y="20" font-size="14" font-weight="bold">Training tokens/s (real tokens), '
        "litpeft vs transformers + peft</text>",
    ]
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        label = f"{r['runner']} {r['method']} {r['precision']} {r['model'].split('-')[0]} {r['data']}"
        label += " compile" if r.get("compile") else ""
        w = width * r["tokens_per_s"] / vmax
        parts += [
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{label}</text>',
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors[r["runner"]]}"/>',
            f'<text x="{left + w + 4:.1f}" y="{y + 13}">{r["tokens_per_s"]:.0f}</text>',
        ]
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
