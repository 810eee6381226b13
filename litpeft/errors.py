"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class LitPeftError(Exception):
    """A problem with the user's input (config, data, model spec, adapter directory)."""
