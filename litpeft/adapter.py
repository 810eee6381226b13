"""Deprecated alias of :mod:`litpeft.adapter_dir` (adapter directories); removed in the next release."""

from litpeft.deprecation import moved_module

moved_module(__name__, "litpeft.adapter_dir")
