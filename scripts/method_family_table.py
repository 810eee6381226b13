"""Write README.md's method x family table from the matrix test's results (never by hand).

    python scripts/method_family_table.py                      # runs tests/matrix (fast + slow), then writes
    python scripts/method_family_table.py --results FILE.jsonl # from an earlier run's results
    python scripts/method_family_table.py --results ALL.jsonl --results RERUN.jsonl
        # a full run, updated by a rerun of some cells (``-k``): a later file's row replaces the cell's row

The matrix test (``tests/matrix/test_matrix.py``) appends one JSON line per cell to
``$LITPEFT_MATRIX_RESULTS``: family, method, precision, base, the refusal (if any), the failed checks and
the known defects. A (method, family) entry of the table is

- ``ok``: every cell of the pair trained and passed every check (all precisions and bases it ran);
- ``refused`` + a footnote: setup refuses the pair with that one line;
- ``xfail (d1, d2)``: some cells fail only checks of known defects (strict xfails): issue #16's defect
  1, 2, or ``new`` for a new finding;
- ``FAIL``: a cell failed a check that is not a known defect.

The table goes between ``<!-- method-family-table:start -->`` and ``<!-- method-family-table:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- method-family-table:start -->", "<!-- method-family-table:end -->"
METHOD_NAMES = {
    "lora": "LoRA",
    "dora": "DoRA",
    "qlora": "QLoRA (nf4)",
    "prompt_tuning": "prompt tuning",
    "p_tuning": "P-tuning",
    "prefix_tuning": "prefix tuning",
    "p_tuning_v2": "P-tuning v2",
    "adapter": "Houlsby adapters",
    "llama_adapter": "LLaMA-Adapter",
    "llama_adapter_v2": "LLaMA-Adapter v2",
    "ia3": "(IA)^3",
    "ln_tuning": "LayerNorm tuning",
    "bitfit": "BitFit",
    "vera": "VeRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "oft": "OFT",
    "adalora": "AdaLoRA",
    "pissa": "LoRA, PiSSA init",
    "loftq": "LoRA, LoftQ init",
}
FAMILY_NAMES = {
    "llama": "Llama",
    "llama3": "Llama 3",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "mistral": "Mistral",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "olmo2": "OLMo 2",
    "granite": "Granite",
}


def run_matrix(results: Path) -> int:
    """Run every matrix cell (fast and slow) with the results written to ``results``."""
    env = {**os.environ, "LITPEFT_MATRIX_RESULTS": str(results)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "", "tests/matrix", "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def table(rows: list[dict]) -> str:
    """The markdown table (methods as rows, families as columns) and its footnotes."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["method"], row["family"])].append(row)
    families = [f for f in FAMILY_NAMES if any(k[1] == f for k in cells)]
    notes: list[str] = []

    def entry(method: str, family: str) -> str:
        runs = cells.get((method, family), [])
        if not runs:
            return "-"
        refused = next((r["refused"] for r in runs if r["refused"]), None)
        if refused:
            refused = refused.split(": ", 1)[-1]  # the same reason for every method it names
            if refused not in notes:
                notes.append(refused)
            mark = f"refused [{notes.index(refused) + 1}]"
            trained = [r for r in runs if not r["refused"]]
            if not trained:
                return mark
            bases = sorted({r["base"] for r in runs if r["refused"]})
            return f"{outcome(trained)}; {'/'.join(bases)} base {mark}"  # e.g. a float-only init on nf4
        return outcome(runs)

    def outcome(runs: list[dict]) -> str:
        unknown = [r for r in runs if set(r["failures"]) - set(r["known"])]
        if unknown:
            return "FAIL"
        known = sorted({d for r in runs if r["failures"] for d in _defects(r["known"], r["failures"])})
        return f"xfail ({', '.join(known)})" if known else "ok"

    header = "| method | " + " | ".join(FAMILY_NAMES[f] for f in families) + " |"
    lines = [header, "|---" * (len(families) + 1) + "|"]
    unnamed = sorted({k[0] for k in cells} - set(METHOD_NAMES))
    if unnamed:  # a new matrix method must get its row, never be left out silently
        raise SystemExit(f"give these matrix methods a name in METHOD_NAMES: {unnamed}")
    for method in METHOD_NAMES:
        if any(k[0] == method for k in cells):
            lines.append(
                f"| {METHOD_NAMES[method]} | " + " | ".join(entry(method, f) for f in families) + " |"
            )
    precisions = sorted({r["precision"] for r in rows})
    lines += [
        "",
        f"{len(rows)} cells ({', '.join(precisions)}; plain and nf4 bases), generated by "
        "`scripts/method_family_table.py` from `tests/matrix`: ok = every cell of the pair passed every "
        "check; xfail (d*N*): some cells fail a check only because of issue #16's known defect *N*, new: a "
        "new finding (see `tests/matrix/expectations.py`); FAIL: any other failed check. Each pair ran "
        "32-true and one of bf16-mixed / bf16-true (alternating over the grid); Llama 3 ran every precision "
        "of every method, also on an nf4 base, and LoRA every precision of every family.",
        "",
    ]
    lines += [f"[{i}] {note}  " for i, note in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def _defects(known: dict[str, str], failures: dict[str, str]) -> set[str]:
    out = set()
    for check in failures:
        match = re.match(r"#16 defect (\d)", known.get(check, ""))
        out.add(f"d{match.group(1)}" if match else "new")
    return out


def cell_key(row: dict) -> tuple[str, str, str, str]:
    return row["family"], row["method"], row["precision"], row["base"]


def merged_rows(files: list[Path]) -> list[dict]:
    """The rows of ``files``, one per cell: a cell's row in a later file replaces its row in an earlier one."""
    rows: dict[tuple[str, str, str, str], dict] = {}
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[cell_key(row)] = row
    return list(rows.values())


def write_readme(text: str, readme: Path = REPO / "README.md") -> None:
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results",
        type=Path,
        action="append",
        help="a results file (JSON lines) of an earlier matrix run; repeated: later files' cells replace earlier ones",
    )
    args = parser.parse_args()
    files = args.results
    if not files:
        files = [Path(tempfile.mkdtemp()) / "matrix.jsonl"]
        code = run_matrix(files[0])
        print(f"matrix run exit code {code}; results in {files[0]}")
    text = table(merged_rows(files))
    write_readme(text)
    print(text)


if __name__ == "__main__":
    main()
