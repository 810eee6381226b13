"""The fault suite's fixtures; the harness itself is tests/faults/harness.py."""

from harness import fault_data, reference, zygote  # noqa: F401 (pytest fixtures)
