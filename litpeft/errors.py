"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero.

Every line names what is wrong (the config key or the path), the value given, and what is allowed:

    litpeft: error: model.method.init_args.r: -1 is not allowed; LoRA's rank must be a positive integer

:class:`InvalidArgument` is raised by the checks at the top of a method's ``__init__`` (and by the CLI's own
checks); :func:`parse_error_line` turns jsonargparse's nested parse errors into the same form.
"""

from __future__ import annotations

import re
from typing import Any


class LitPeftError(Exception):
    """A problem with the user's input (config, data, model spec, adapter directory)."""


class InvalidArgument(LitPeftError, ValueError):
    """``key: value is not allowed; allowed``. ``key`` is relative to ``scope`` (``"method"``: the method's
    ``init_args``) until the caller that knows where the object sits in the config prefixes it (:meth:`under`).
    A ``ValueError`` too, so code that built an object by hand and caught ``ValueError`` keeps working."""

    def __init__(self, key: str, value: Any, allowed: str, scope: str | None = None) -> None:
        self.key, self.value, self.allowed, self.scope = key, value, allowed, scope
        super().__init__(f"{key}: {value!r} is not allowed; {allowed}")

    def under(self, prefix: str) -> InvalidArgument:
        """The same error with its key placed under ``prefix`` (e.g. ``model.method.init_args.``)."""
        return InvalidArgument(prefix + self.key, self.value, self.allowed)


def check(ok: bool, key: str, value: Any, allowed: str, scope: str | None = None) -> None:
    """Raise :class:`InvalidArgument` unless ``ok``."""
    if not ok:
        raise InvalidArgument(key, value, allowed, scope)


def find_cause(exc: BaseException | None, kind: type[BaseException] = LitPeftError) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s chain (``__cause__`` and ``__context__``), else ``None``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [e.__cause__, e.__context__]
    return None


# -- jsonargparse's parse errors, in one line ------------------------------------------------------------
_KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def _describe_type(body: list[str]) -> str | None:
    """What the innermost key accepts, from its ``Subtypes:`` or ``Expected a ...`` lines: ``an integer``,
    ``one of: a, b``; ``None`` when it expects only classes (then the value is a class path)."""
    text = "\n".join(ln for ln in body if "Subtypes:" in ln or "Expected a" in ln)
    literal = re.findall(r"Literal\[([^\]]*)\]", text)
    kinds = [k for k in re.findall(r"<class '([\w.]+)'>", text) if k != "NoneType"]
    values = [v.strip().strip("'\"") for group in literal for v in group.split(",")]
    named = [_TYPE_NAMES[k] for k in dict.fromkeys(kinds) if k in _TYPE_NAMES] + (
        ["one of: " + ", ".join(dict.fromkeys(values))] if values else []
    )
    return " or ".join(named) or None


def _deepest_key(lines: list[str]) -> tuple[str, list[str]]:
    """The config key of the innermost ``Parser key`` in jsonargparse's nested message, and its body.

    A key nested under ``Problem with given class_path`` sits in that class's ``init_args``; the first one
    under ``model``/``data`` is left out, as ``--model.method`` lets a user write it.
    """
    best: tuple[int, int] | None = None  # (depth, line index)
    for i, line in enumerate(lines):
        if _KEY.match(line) and (best is None or _indent(line) > best[0]):
            best = (_indent(line), i)
    if best is None:
        return "", lines
    depth, index = best
    parts: list[str] = []
    level = depth + 1
    for line in reversed(lines[: index + 1]):
        if _indent(line) >= level:
            continue
        m, c = _KEY.match(line), _CLASS.search(line)
        if m:
            parts.insert(0, m.group(2))
            level = _indent(line)
        elif c:
            parts.insert(0, "init_args")
            level = _indent(line)
    if len(parts) > 2 and parts[0] in ("model", "data") and parts[1] == "init_args":
        del parts[1]
    body = [lines[index].split(":", 1)[1]] + [ln for ln in lines[index + 1 :] if _indent(ln) > depth]
    return ".".join(parts), [b for b in body if b.strip()]


def _given(body: list[str], message: str) -> str | None:
    for line in body:
        m = re.search(r"(?:Got value|Given value): (.*)$", line)
        if m and "NestedArg(" not in m.group(1):
            return m.group(1).strip()
    m = re.search(r"NestedArg\(key='[^']*', val=(.*)\)\s*$", message, re.M)
    return m.group(1).strip("'\"") if m else None


def parse_error_line(message: str, methods: list[str] | None = None) -> str:
    """One line for a jsonargparse parse error: the key, the value and what is allowed where it can tell."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    key, body = _deepest_key(lines)
    where = f"{key}: " if key else ""
    text = "\n".join(body)
    known = methods and key.endswith("method")
    for pattern, template in (
        (r"Option '([^']+)' is not accepted", "unknown option '{0}'"),
        (r'Key "([^"]+)" is not expected', "unknown config key '{0}'"),
        (r"No module named '([^']+)'", "cannot import '{0}'"),
    ):
        m = re.search(pattern, text)
        if m:
            return where + template.format(*m.groups())
    given = _given(body, message)
    expected = _describe_type(body)
    if expected is not None and given is not None:
        return f"{where}{given!r} is not allowed; expected {expected}"
    for pattern in (
        r"Expected a dot import path string: (\S+)",
        r"Import path (\S+) does not correspond",
        r"Problem with given class_path '([^']+)':\s*module '[^']+' has no attribute",
    ):
        m = re.search(pattern, text)
        if m:
            hint = f" (built-in methods: {', '.join(sorted(methods or []))})" if known else ""
            return f"{where}unknown class '{m.group(1)}'{hint}"
    m = re.search(r"File does not exist: '([^']+)'", text)
    if m:
        return f"{where}file '{m.group(1)}' does not exist"
    first = [ln.strip() for ln in body if ln.strip() and "Union subtypes" not in ln]
    return where + ("; ".join(first[:2]) if first else "invalid value")
