"""Merging and resizing adapters: ``resize`` (dynamic-rank truncation computed from the factors)
and ``merge`` (``concat``: the exact weighted sum of the inputs' updates)."""

from loradex.merge.concat import MergeReport, merge
from loradex.merge.resize import ResizeReport, resize

__all__ = ["MergeReport", "ResizeReport", "merge", "resize"]
