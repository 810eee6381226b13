"""Runs many ``litpeft`` commands cheaply: imports litpeft once, then forks one child per command.

Reads JSON lines on stdin: ``{"run": {"argv": [...], "log": path, "fault": {...}}}`` starts a child and
answers ``{"pid": N}``; ``{"wait": N}`` waits for it and answers ``{"rc": code}`` (``-signal`` when a
signal ended it). Each child sends its output to ``log`` and writes its event count and first training step to ``log + ".events"`` (JSON).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch

from litpeft.cli import main

torch.set_num_threads(1)


def child(req: dict) -> None:
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import plug

    plug.install(req.get("fault") or {})
    code = 0
    try:
        main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(req["log"] + ".events", "w") as f:
        f.write(json.dumps(plug.COUNT))
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if "run" in req:
            pid = os.fork()
            if pid == 0:
                child(req["run"])
            answer = {"pid": pid}
        else:
            _, status = os.waitpid(req["wait"], 0)
            answer = {"rc": os.waitstatus_to_exitcode(status)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
