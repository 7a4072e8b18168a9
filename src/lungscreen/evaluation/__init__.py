"""Measuring models honestly: metrics with bootstrap confidence intervals.

Import figures from :mod:`lungscreen.evaluation.metrics`, the one metrics module; it re-exports the
resampling (:mod:`~lungscreen.evaluation.bootstrap`) and the curves (:mod:`~lungscreen.evaluation.curves`),
and :mod:`~lungscreen.evaluation.checks` holds what every figure function accepts.
"""
