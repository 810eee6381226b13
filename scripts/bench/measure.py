"""Measurements shared by the workers and the driver: step timer, resident memory, FLOPs, machine facts."""

from __future__ import annotations

import contextlib
import importlib
import platform
import re
import time
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class StepTimer:
    """Wall time and token counts of each training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.padded: list[int] = []
        self.cpu: list[float] = []  # process CPU seconds: with one thread, a load-independent A/B measure
        self.rss_before = float("nan")  # resident MiB before the model is built (set by the runner)
        self._t0 = self._c0 = 0.0

    def start(self, batch: dict[str, Any]) -> None:
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.loss_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        self.padded.append(int(batch["input_ids"].shape[1]))
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def model_flops(model: Any, tokens: int, padded_len: int, head_tokens: int, extra_keys: int = 0) -> float:
    """Model FLOPs of one training step (see scripts/benchmark.py's docstring for the formula).

    ``N`` counts the linear layers inside the decoder blocks (base and method layers alike), so a
    reparameterization network that runs once per step (prefix tuning's MLP) is not counted per token.
    """
    from torch import nn

    block = re.compile(r"(^|\.)(layers|h)\.\d+\.")
    linear = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and block.search(n)]
    n_linear = sum(m.weight.numel() for m in linear)
    n_train = sum(m.weight.numel() for m in linear if m.weight.requires_grad)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_attention_heads * head_dim
    head = model.get_output_embeddings()
    head_flops = 2 * head.in_features * head.out_features
    attn = 4 * cfg.num_hidden_layers * width * (padded_len + extra_keys)
    forward = 2 * n_linear * tokens + attn * tokens + head_flops * head_tokens
    backward = 2 * n_linear * tokens + 2 * attn * tokens + head_flops * head_tokens + 2 * n_train * tokens
    return float(forward + backward)


def matmul_peak(dtype_name: str, seconds: float = 1.0) -> float:
    """Best matmul FLOP/s over a few square and model-like shapes, in ``dtype_name``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best = 0.0
    for m, k, n in [(1024, 1024, 1024), (2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576)]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "lightning"):
        with contextlib.suppress(Exception):
            out[name] = importlib.import_module(name).__version__
    return out


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
