"""Choosing the arithmetic of training steps: float32 or bf16 autocast, by what is faster on this machine."""

from __future__ import annotations

import copy
import time


def measure_precision(model, image_size: int, batch_size: int, in_channels: int = 1, repeats: int = 3) -> dict[str, float]:  # noqa: ANN001
    """Seconds per training step in float32 and in bf16 autocast (a copy of the model; best of ``repeats``),
    in the channels-last layout training uses."""
    import torch

    from lungscreen.training.module import channels_last

    probe = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    images = channels_last(torch.rand(batch_size, in_channels, image_size, image_size))
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad] or list(probe.parameters()), lr=0.0)
    timings = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        best = float("inf")
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                outputs = probe(images)
                loss = sum(o.float().square().mean() for o in (outputs.values() if isinstance(outputs, dict) else [outputs]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if attempt:  # the first is a warm-up
                best = min(best, time.perf_counter() - start)
        timings[f"{name}_step_s"] = best
    return timings
