"""``pip install litpeft`` leaves an existing torch alone.

A user's environment already has torch (a CUDA, ROCm or CPU build). If litpeft's dependencies pinned
torch (as ``torch==2.13.0`` once did), pip would replace it. The test builds that environment for real:

1. a fresh venv (``python -m venv``, pip from ensurepip: offline);
2. a fake ``torch`` 2.6.0 wheel (the oldest torch litpeft declares) built here with the standard library:
   a zip with ``torch/__init__.py`` and ``*.dist-info/{METADATA,WHEEL,RECORD}``; installed with
   ``--no-index --find-links``, so no multi-GB download and no network;
3. ``pip install --dry-run --report`` of this checkout (with the ``quant`` extra, so bitsandbytes is
   resolved too) against PyPI: pip builds litpeft's metadata with setuptools (build isolation, fetched
   from PyPI) and resolves every real dependency (lightning, transformers, torchmetrics, ... with their
   own ``torch`` requirements) from package metadata only. The report lists what pip would install.

The assertion: torch is not in that list. The same resolution with a copy of the project whose
pyproject pins ``torch==2.13.0`` does list torch: so the test fails on a pin. pip runs with
``PIP_CONFIG_FILE=/dev/null`` and no other ``PIP_*`` settings (the reference machines' pip config adds a
local wheel directory and a torch cap that a user's machine does not have); the certificate bundle and
timeout are kept. Needs PyPI (the metadata of ~40 packages, cached by pip after the first run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

FAKE_TORCH = "2.6.0"


def build_fake_wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal valid wheel of an empty package ``name``: metadata, an ``__init__.py`` and a RECORD."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: litpeft-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def pip_env() -> dict[str, str]:
    """This process's environment without pip settings, except the certificate bundle and timeout."""
    keep = {"PIP_CERT", "PIP_DEFAULT_TIMEOUT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no config file at all
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def run(cmd: list[str | Path]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], env=pip_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv_with_torch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv whose only package (besides pip) is a fake torch 2.6.0; returns its python."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    wheels.mkdir()
    build_fake_wheel(wheels, "torch", FAKE_TORCH)
    run([sys.executable, "-m", "venv", root / "venv"])
    python = root / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, f"torch=={FAKE_TORCH}"])
    version = run([python, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    assert version == FAKE_TORCH
    return python


def would_install(python: Path, project: Path, tmp_path: Path) -> dict[str, str]:
    """``{name: version}`` of what ``pip install <project>[quant]`` would install or upgrade."""
    report = tmp_path / "report.json"
    run([python, "-m", "pip", "install", "-q", "--dry-run", "--report", report, f"{project}[quant]"])
    items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}


def project_copy(destination: Path, pyproject: str) -> Path:
    """The files setuptools needs for litpeft's metadata, with another pyproject.toml."""
    destination.mkdir()
    shutil.copy(REPO / "README.md", destination / "README.md")
    shutil.copytree(REPO / "litpeft", destination / "litpeft", ignore=shutil.ignore_patterns("__pycache__"))
    (destination / "pyproject.toml").write_text(pyproject)
    return destination


@pytest.mark.slow
def test_pip_install_leaves_an_existing_torch_alone(venv_with_torch: Path, tmp_path: Path) -> None:
    # a copy too (not REPO itself): setuptools writes litpeft.egg-info next to the sources it builds
    project = project_copy(tmp_path / "litpeft", (REPO / "pyproject.toml").read_text())
    planned = would_install(venv_with_torch, project, tmp_path)
    assert {"litpeft", "lightning", "transformers", "bitsandbytes"} <= planned.keys(), planned
    assert "torch" not in planned, f"pip would replace torch {FAKE_TORCH} with {planned.get('torch')}"


@pytest.mark.slow
def test_a_pinned_torch_would_be_replaced(venv_with_torch: Path, tmp_path: Path) -> None:
    """The check above can fail: with the pin litpeft had before, pip replaces the user's torch."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.6",' in pyproject
    project = project_copy(tmp_path / "litpeft", pyproject.replace('"torch>=2.6",', '"torch==2.13.0",'))
    assert would_install(venv_with_torch, project, tmp_path).get("torch") == "2.13.0"
