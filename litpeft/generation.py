"""Deprecated: batched generation moved to :mod:`litpeft.inference`, exact match and the
``ExactMatchEvaluation`` callback to :mod:`litpeft.evaluation`; these names are removed in the next release.

A config naming ``litpeft.generation.ExactMatchEvaluation`` still runs, with a FutureWarning.
"""

from litpeft.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "generate": "litpeft.inference",
        "split_for_generation": "litpeft.inference",
        "exact_match": "litpeft.evaluation",
        "normalize": "litpeft.evaluation",
        "ExactMatchEvaluation": "litpeft.evaluation",
    },
)
