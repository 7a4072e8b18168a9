"""Inference: batch prediction with a trained run."""
