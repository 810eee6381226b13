"""Deprecated alias of :mod:`litpeft.methods.bottleneck` (the Houlsby/Pfeiffer bottleneck adapters).

Keeps ``class_path: litpeft.methods.adapter.HoulsbyAdapter`` in configs and adapter directories working for
one release, with a FutureWarning.
"""

from litpeft.deprecation import moved_module

moved_module(__name__, "litpeft.methods.bottleneck")
