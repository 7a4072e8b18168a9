"""Training: one Lightning engine for every recipe (configs, data, sampling, stages, runs, search)."""
