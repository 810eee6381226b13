"""Throughput of ``litpeft serve`` at 1, 4 and 16 concurrent clients (not a test).

    nice -n 19 python scripts/benchmark_serve.py --model smollm2-135m-instruct

Starts ``litpeft serve`` with the base and one LoRA adapter of it (r 8 on q/v, saved from a fresh
``PeftLM`` into a temporary directory: its cost per token is a trained adapter's), waits for
``/health``, then for each concurrency level lets that many client threads (the official ``openai``
client) send greedy chat requests to the adapter, each a different prompt with ``--max_tokens``, until
``--requests`` have been answered. Reported per level: requests/s and generated tokens/s over the
level's wall time, and the median and 95th-percentile request latency. One warm-up request runs first.
Prints a Markdown table and writes the figures as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOPICS = ["rivers", "bread", "comets", "violins", "glaciers", "owls", "bridges", "tea", "maps", "clocks"]


def make_adapter(model: str, directory: Path) -> Path:
    from litpeft import PeftLM
    from litpeft.adapter_dir import save_adapter
    from litpeft.data.prompts import get_style
    from litpeft.methods import LoRA

    lm = PeftLM(model=model, method=LoRA(r=8))
    lm.configure_model()
    return save_adapter(directory, lm, get_style("auto", lm.tokenizer))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def level(client: Any, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``requests`` chat requests from ``clients`` threads; throughput and latency."""

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        prompt = f"Write two sentences about {TOPICS[i % len(TOPICS)]} (request {i})."
        out = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": requests,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="per level (at least the clients)")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="serve_benchmark.json")
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(args.model, Path(tmp) / "bench")
        port = free_port()
        cmd = [sys.executable, "-m", "litpeft", "serve", "--adapter", f"bench={adapter}", "--port", str(port)]
        cmd += ["--device", args.device, "--max_batch_size", str(args.max_batch_size)]
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
            level(client, 1, 1, args.max_tokens)  # warm-up
            rows = []
            for c in args.clients:
                rows.append(level(client, c, max(c, args.requests), args.max_tokens))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            finally:
                with contextlib.suppress(ProcessLookupError):  # workers outliving the shutdown
                    os.killpg(proc.pid, signal.SIGKILL)
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model": args.model,
        "adapter": "LoRA r 8 (q_proj, v_proj)",
        "device": args.device,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "litserve": version("litserve"),
    }
    Path(args.output).write_text(json.dumps({"meta": meta, "levels": rows}, indent=2) + "\n")
    print(json.dumps(meta))
    print("| clients | requests | requests/s | tokens/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
            f"{r['latency_p50_s']} | {r['latency_p95_s']} |"
        )


if __name__ == "__main__":
    main()
