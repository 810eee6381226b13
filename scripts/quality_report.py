"""docs/quality.md (and its JSON) from scripts/quality.py's results: the table, the machine, the versions."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.config import REPO

#: what follows this line in the page is written by hand and kept when the page is rewritten
NOTES = "<!-- notes: kept by scripts/quality.py -->"


def peft_name(r: dict[str, Any] | None) -> str:
    """The peft config a peft row ran with, from its recorded ``peft_config`` ("-": no peft row)."""
    if r is None or "peft_config" not in r:
        return "-"
    cfg = r["peft_config"]
    name = cfg["class"]
    if cfg.get("use_dora"):
        return f"{name} (use_dora)"
    if r.get("method") == "p_tuning_v2":
        return f"{name} (no projection)"
    return name


def machine() -> dict[str, Any]:
    """CPU model, cores, and the load when the page was written."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform()}


def cpus(results: list[dict[str, Any]], current: str) -> str:
    """The CPUs the rows ran on ("an unrecorded CPU": rows from before the ``cpu`` field)."""
    names = sorted({r.get("cpu", "an unrecorded CPU") for r in results})
    return " and ".join(names) if names else current


def versions() -> dict[str, str]:
    import lightning
    import peft
    import torch
    import transformers

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "litpeft": commit or "unknown",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def _em(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return "error" if "error" in r else f"{r['exact_match']:.2f}"


def _secs(r: dict[str, Any] | None, key: str) -> str:
    return "-" if r is None or key not in r else f"{r[key]:.0f}"


def write_report(
    results: list[dict[str, Any]], out: Path, expected: list[str], in_peft: set[str] | None = None
) -> None:
    """Write ``out`` (markdown) and ``out.with_suffix('.json')`` from ``results``; ``in_peft``: the
    methods peft has (the others' peft column says "not in peft"; ``None``: all of them)."""
    by = {(r["side"], r.get("method")): r for r in results}
    methods = [m for m in expected if ("litpeft", m) in by or ("peft", m) in by]
    missing = [m for m in expected if m not in methods]
    base = by.get(("base", None))
    finished = sorted(r["finished"] for r in results if "finished" in r)
    date = (
        f"{finished[0]} to {finished[-1]}"
        if finished
        else dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    )
    meta = {"date": date, **machine()}
    meta["versions"] = versions()
    steps = sorted({r["steps"] for r in results if r["side"] != "base"})
    limits = sorted({r["limit"] or 100 for r in results}, reverse=True)
    lines = [
        "# Learning quality, side by side",
        "",
        "Written by `scripts/quality.py` (do not edit by hand). Each method's shipped config "
        "(`configs/<method>.yaml`: method arguments, AdamW LR, warmup-cosine schedule, clipping 1.0, "
        "bf16-mixed) trained on the bundled demo task (date normalization, `make demo`'s) for "
        f"{', '.join(map(str, steps)) or '-'} steps at batch 8 by litpeft (`PeftLM` + `Trainer.fit`) and, "
        "where peft has the method, by peft (`get_peft_model`, a plain PyTorch loop) on the same batches, "
        "LR schedule, clipping and autocast. Exact match: greedy answers to the "
        f"{'/'.join(map(str, limits))} held-out rows, measured as `make demo` does "
        "(`ExactMatchEvaluation`, 12 new tokens). Train s: the optimizer steps only; total s: the whole "
        "process (model load, training, evaluation). One job at a time, sides alternating per method.",
        "",
    ]
    if missing:
        lines += [f"**Partial:** not measured in this run: {', '.join(missing)}.", ""]
    if base is not None:
        lines += [f"Base model (no adapter): exact match {_em(base)}.", ""]
    lines += [
        "| method | config LR | litpeft EM | peft EM | peft config | litpeft train s | peft train s "
        "| litpeft total s | peft total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        lit, pef = by.get(("litpeft", m)), by.get(("peft", m))
        any_r = lit or pef or {}
        lines.append(
            f"| {m} | {any_r.get('lr', '-')} | {_em(lit)} | {_em(pef)} | "
            f"{peft_name(pef) if in_peft is None or m in in_peft else 'not in peft'} | "
            f"{_secs(lit, 'train_s')} | {_secs(pef, 'train_s')} | {_secs(lit, 'total_s')} | {_secs(pef, 'total_s')} |"
        )
    v = meta["versions"]
    lines += [
        "",
        f"Runs finished {meta['date']} on {cpus(results, meta['cpu'])} ({meta['cores']} cores, one job at "
        f"a time), {meta['os']}.",
        "Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k != "litpeft")
        + "; litpeft commit of each run: "
        + ", ".join(sorted({r["litpeft"] for r in results if "litpeft" in r}))
        + " (+ the working tree).",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = out.read_text().partition(NOTES)[2] if out.is_file() else ""
    out.write_text("\n".join(lines) + (NOTES + notes if notes else ""))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


#: README.md's copy of the table goes between these lines
README_START, README_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def readme_table(results: list[dict[str, Any]], expected: list[str]) -> str:
    """The short form of the page's table for README.md: exact match and train time of both sides."""
    by = {(r["side"], r.get("method")): r for r in results}
    base = by.get(("base", None))
    steps = sorted({r["steps"] for r in results if r["side"] != "base"})
    finished = sorted(r["finished"][:10] for r in results if "finished" in r)
    lines = [
        f"Generated by `scripts/quality.py` ({'/'.join(map(str, steps))} steps at batch 8 on the demo task, "
        f"SmolLM2-135M, {finished[-1] if finished else '-'}, {machine()['cores']}-core CPU; details, "
        "versions and caveats in [docs/quality.md](docs/quality.md)). Exact match on the 100 held-out rows"
        + (f"; the base model's is {_em(base)}" if base else "")
        + ". peft `-`: peft has no such method.",
        "",
        "| method | litpeft EM | peft EM | litpeft train s | peft train s |",
        "|---|---|---|---|---|",
    ]
    for m in expected:
        lit, pef = by.get(("litpeft", m)), by.get(("peft", m))
        if lit or pef:
            lines.append(
                f"| {m} | {_em(lit)} | {_em(pef)} | {_secs(lit, 'train_s')} | {_secs(pef, 'train_s')} |"
            )
    return "\n".join(lines) + "\n"


def write_readme_table(table: str, readme: Path = REPO / "README.md") -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section for the table")
    head, _, rest = text.partition(README_START)
    readme.write_text(head + README_START + "\n" + table + README_END + rest.partition(README_END)[2])
