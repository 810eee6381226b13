"""``litpeft serve``: an OpenAI-compatible server for a base model and its adapters, on LitServe.

litpeft serve --adapter colors=runs/colors/adapter --adapter dates=runs/dates/adapter --port 8000

LitServe (``pip install 'litpeft[serve]'``) is imported only here, when a server is started.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from litpeft.errors import LitPeftError
from litpeft.inference import Dtype, parse_device
from litpeft.serve.models import ServeSpec, parse_adapters, plan

log = logging.getLogger(__name__)

#: The hosts LitServe binds to.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


def build_server(
    spec: ServeSpec,
    device: str = "auto",
    max_tokens: int = 256,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    api_key: str | None = None,
    timeout: float | None = None,
) -> Any:
    """The ``litserve.LitServer`` (not started): one inference worker holding every model."""
    try:
        import litserve as ls

        from litpeft.serve.api import OpenAIEndpoints, PeftAPI
    except ImportError as e:
        raise LitPeftError(f"litpeft serve needs LitServe: pip install 'litpeft[serve]' ({e})") from None
    endpoints = OpenAIEndpoints(spec.names, spec.base_name, api_key)
    api = PeftAPI(spec, endpoints, max_tokens, max_batch_size, batch_timeout)
    where = parse_device(device)
    return ls.LitServer(
        api,
        accelerator="cuda" if where.type == "cuda" else "cpu",
        devices=[where.index or 0] if where.type == "cuda" else 1,
        workers_per_device=1,
        timeout=timeout if timeout is not None else False,
    )


def serve(
    adapter: list[str] | None = None,
    model: str | None = None,
    base_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens: int = 256,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    prompt_style: str | None = None,
    dtype: Dtype | None = None,
    device: str = "auto",
    api_key: str | None = None,
    timeout: float | None = None,
    log_level: str = "warning",
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> None:
    """Serve a base model and adapters over an OpenAI-compatible API (chat, completions, models).

    Each request names its model: an adapter's NAME, or the base's name for the bare base. Requests
    for the same model are generated in batches; streaming (``"stream": true``) sends server-sent events.

    Args:
        adapter: ``NAME=DIR`` (or ``DIR``, named after its folder); repeat it to serve several adapters
            on one base.
        model: base model spec (default: the adapters' base).
        base_name: the name the bare base answers to (default: its spec).
        host: ``127.0.0.1`` (this machine only), ``0.0.0.0`` or ``::`` (every interface).
        port: TCP port.
        max_tokens: a request's ``max_tokens`` when it gives none (capped by the context length).
        max_batch_size: most requests generated together.
        batch_timeout: seconds to wait for more requests before a batch starts (> 0).
        prompt_style: override every adapter's saved prompt style (and the base's ``auto``).
        dtype: load the base in this dtype (default float32).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        api_key: require ``Authorization: Bearer API_KEY`` (the ``openai`` client's ``api_key``).
        timeout: seconds a request may wait in the queue before a 504 (default: no limit).
        log_level: uvicorn's and LitServe's log level.
        trust_remote_code: allow code from the model directory to run.
        allow_other_base: serve adapters on a base whose weights differ from the one they were trained on.
    """
    if host not in HOSTS:
        raise LitPeftError(f"--host must be one of {', '.join(HOSTS)}, got '{host}'")
    if not 1024 <= port <= 65535:
        raise LitPeftError(f"--port must be in 1024..65535, got {port}")
    if max_tokens <= 0 or max_batch_size <= 0 or batch_timeout <= 0:
        # batch_timeout 0 would make LitServe's batching loop poll its queue without pause when idle
        raise LitPeftError("--max_tokens, --max_batch_size and --batch_timeout must be positive")
    spec = plan(
        parse_adapters(adapter or []),
        model,
        base_name,
        dtype=dtype,
        prompt_style=prompt_style,
        trust_remote_code=trust_remote_code,
        allow_other_base=allow_other_base,
    )
    server = build_server(spec, device, max_tokens, max_batch_size, batch_timeout, api_key, timeout)

    main = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main:  # a forked uvicorn worker, which re-raises the signal once it has stopped
            os._exit(0)
        raise KeyboardInterrupt  # LitServe shuts its workers down on it

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {', '.join(spec.names)} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    server.run(host=host, port=port, generate_client_file=False, log_level=log_level)


def adapter_flags(argv: list[str]) -> list[str]:
    """``--adapter X --adapter Y`` -> ``--adapter+ X --adapter+ Y`` (jsonargparse appends to a list so)."""
    out = []
    for arg in argv:
        if arg == "--adapter":
            arg = "--adapter+"
        elif arg.startswith("--adapter="):
            arg = "--adapter+=" + arg.removeprefix("--adapter=")
        out.append(arg)
    return out
