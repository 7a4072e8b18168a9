"""Measuring models honestly: metrics with bootstrap confidence intervals."""
