"""The bundled demo data is exactly what its generator script produces, with disjoint splits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from litpeft.data.sources import DEMO_DIR
from tests.conftest import REPO


def test_bundled_demo_data_regenerates_identically(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


def test_validation_dates_never_appear_in_training() -> None:
    rows = {
        s: [json.loads(x) for x in (DEMO_DIR / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "val")
    }
    assert len(rows["train"]) == 2000 and len(rows["val"]) == 100
    assert not {r["output"] for r in rows["val"]} & {r["output"] for r in rows["train"]}
