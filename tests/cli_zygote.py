"""Run ``litpeft`` command lines in forked children of one warm interpreter (the errors catalogue's runner).

A fresh ``python -m litpeft`` spends most of its seconds importing torch, transformers and Lightning. This
process imports ``litpeft.cli`` once, then for each request (a JSON line on stdin: argv, cwd, env, and the
files for stdout/stderr) forks a child that behaves as a fresh ``python -m litpeft`` would from there: its
own working directory, its own stdout/stderr file descriptors, ``sys.argv``, the same ``main()``, an
uncaught exception printed as the interpreter prints it (exit 1). The parent answers each request with
one JSON line ``{"returncode": N}``. Nothing runs before the fork but imports, so no thread pool exists
yet that a child could inherit half-locked.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from litpeft.cli import main


def _child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["litpeft", *request["argv"]]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(request)
            finally:
                os._exit(70)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"returncode": code}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
