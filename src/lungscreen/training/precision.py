"""Choosing the arithmetic of training steps for ``precision: auto``: float32 or bf16 autocast.

The hardware decides, not a stopwatch alone. A bare timing would make a recipe's arithmetic depend on what
else ran when it started (fp32 on a busy machine, bf16 on an idle one), so the CPU's features set the
default and the measurement may only overturn it by a wide margin (:data:`SLOWER_MARGIN`):

* matrix units for bf16 (Intel AMX): bf16, unless it measures clearly slower for this model (a tiny network
  on small images, where the casts cost more than bf16 saves);
* bf16 in the vector unit only (AVX512-BF16, Arm's BF16): fp32, unless bf16 measures clearly faster (on such
  a CPU without AMX the shipped recipes' models measured 0.96-1.15 x fp32: no gain worth a rounding change);
* no native bf16, or no oneDNN: fp32, nothing measured; a GPU follows its bf16 support.

fp32 and bf16 steps run in interleaved pairs, so a load that comes and goes slows both steps of a pair
alike, and the median of the per-pair ratios is what counts.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Flags (``/proc/cpuinfo`` names: x86 ``flags``, Arm ``Features``) meaning the CPU computes bf16 natively.
#: ``amx_tile`` stands for AMX where only the tile unit can be probed: every AMX CPU so far has AMX-BF16.
NATIVE_BF16 = ("amx_bf16", "amx_tile", "avx512_bf16", "bf16", "svebf16")
#: The ones that are matrix units: there bf16 is the default; with the others, fp32 is.
MATRIX_BF16 = ("amx_bf16", "amx_tile")
#: Flags recorded in ``precision.json`` to say what the decision saw.
RECORDED = (*NATIVE_BF16, "amx_int8", "amx_fp16", "avx512f", "avx2", "sve")
#: The default is overturned only when the other arithmetic measures more than this fraction faster. Beyond
#: the noise: one model's per-pair ratios spread by +-15 % under load, the median of 5 pairs by +-4 %.
SLOWER_MARGIN = 0.25
#: Timed fp32/bf16 pairs (after one warm-up pair); the median of 5 ignores two pairs a load edge cuts.
REPEATS = 5


@dataclass(frozen=True)
class Decision:
    """``choice`` (``"32"`` or ``"bf16"``) and the one-line ``reason`` the run prints and records."""

    choice: str
    reason: str


@dataclass(frozen=True)
class Hardware:
    """What the decision looks at: the CPU's bf16-related flags, PyTorch's view of it, and a GPU if any."""

    cpu_flags: tuple[str, ...]
    cpu_capability: str
    onednn: bool
    gpu: str | None = None
    gpu_bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"cpu_flags": list(self.cpu_flags), "cpu_capability": self.cpu_capability, "onednn": self.onednn,
                "gpu": self.gpu, "gpu_bf16": self.gpu_bf16}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The :data:`RECORDED` flags this CPU has: from ``/proc/cpuinfo`` on Linux, else PyTorch's own probes."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return _probed_flags()
    seen: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            seen.update(value.split())
    return tuple(flag for flag in RECORDED if flag in seen)


def _probed_flags() -> tuple[str, ...]:
    """Flags from PyTorch's cpuinfo probes (private helpers, hence guarded), for systems without /proc."""
    import torch

    probes = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "avx512f": "_is_avx512_supported", "avx2": "_is_avx2_supported"}
    found = []
    for flag, probe in probes.items():
        try:
            if getattr(torch.cpu, probe)():
                found.append(flag)
        except (AttributeError, RuntimeError):
            continue
    return tuple(flag for flag in RECORDED if flag in found)


def detect_hardware() -> Hardware:
    """The CPU's flags, PyTorch's CPU capability, oneDNN, and the GPU training would use (if any)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Hardware(cpu_flags=cpu_flags(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    onednn=torch.backends.mkldnn.is_available(), gpu=gpu,
                    gpu_bf16=bool(gpu) and torch.cuda.is_bf16_supported())


def needs_measurement(hardware: Hardware) -> bool:
    """Only a CPU with native bf16 is measured: elsewhere the features alone decide."""
    return hardware.gpu is None and hardware.onednn and _native(hardware.cpu_flags) != ()


def decide(hardware: Hardware, timings: Mapping[str, Any] | None = None, *,
           margin: float = SLOWER_MARGIN) -> Decision:
    """fp32 or bf16 from the hardware, with ``timings`` (see :func:`measure_precision`) as a veto only.

    A GPU follows its bf16 support; a CPU without native bf16 (or PyTorch without oneDNN) gets fp32; a CPU
    with AMX gets bf16 unless the measured bf16/fp32 step ratio exceeds ``1 + margin``; a CPU with bf16 in its
    vector unit only gets fp32 unless the ratio is below ``1 / (1 + margin)``.
    """
    if hardware.gpu is not None:
        return (Decision("bf16", f"GPU {hardware.gpu} supports bf16") if hardware.gpu_bf16
                else Decision("32", f"GPU {hardware.gpu} lacks bf16"))
    if not hardware.onednn:
        return Decision("32", "PyTorch has no oneDNN here, so bf16 would be emulated")
    native = _native(hardware.cpu_flags)
    if not native:
        return Decision("32", f"the CPU has no native bf16 (no AMX, no AVX512-BF16; {hardware.cpu_capability})")
    default = "bf16" if any(flag in MATRIX_BF16 for flag in native) else "32"
    has = f"the CPU has {'+'.join(native)}" + ("" if default == "bf16" else " (no AMX: fp32 unless bf16 is clearly faster)")
    ratio = timings.get("bf16_ratio") if timings else None
    if ratio is None:
        return Decision(default, has)
    measured = f"bf16 step {ratio:.2f} x fp32 (median of {timings.get('pairs', '?')} interleaved pairs)"
    if default == "bf16" and ratio > 1.0 + margin:
        return Decision("32", f"{has} but {measured}, over the {margin:.0%} margin")
    if default == "32" and ratio < 1.0 / (1.0 + margin):
        return Decision("bf16", f"{has}, and {measured}, beyond the {margin:.0%} margin")
    return Decision(default, f"{has}; {measured}")


def _native(flags: Collection[str]) -> tuple[str, ...]:
    return tuple(flag for flag in NATIVE_BF16 if flag in flags)


def interleaved_seconds(steps: Mapping[str, Callable[[], object]], repeats: int = REPEATS,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each named step over ``repeats`` rounds, after one warm-up round.

    The two steps of a round run back to back, in alternating order (AB BA AB ...), so a load that starts
    or stops during the measurement hits both steps of all but the rounds it cuts.
    """
    names = list(steps)
    for name in names:
        steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for attempt in range(repeats):
        for name in names if attempt % 2 == 0 else names[::-1]:
            start = clock()
            steps[name]()
            seconds[name].append(clock() - start)
    return seconds


def summarize(seconds: Mapping[str, list[float]]) -> dict[str, Any]:
    """Median step times and the median of the per-round bf16/fp32 ratios (what :func:`decide` reads)."""
    ratios = [b / f for f, b in zip(seconds["fp32"], seconds["bf16"], strict=True) if f > 0]
    return {"fp32_step_s": statistics.median(seconds["fp32"]), "bf16_step_s": statistics.median(seconds["bf16"]),
            "bf16_ratio": statistics.median(ratios) if ratios else None, "pairs": len(ratios),
            "fp32_steps_s": [round(s, 5) for s in seconds["fp32"]],
            "bf16_steps_s": [round(s, 5) for s in seconds["bf16"]]}


def measure_precision(model, image_size: int, batch_size: int, in_channels: int = 1,  # noqa: ANN001
                      repeats: int = REPEATS) -> dict[str, Any]:
    """Seconds per training step in float32 and in bf16 autocast, interleaved (a copy of the model, in the
    channels-last layout training uses): medians, the per-round ratio and every step (:func:`summarize`)."""
    import torch

    from lungscreen.training.module import channels_last

    probe = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    images = channels_last(torch.rand(batch_size, in_channels, image_size, image_size))
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad] or list(probe.parameters()), lr=0.0)

    def step(enabled: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            outputs = probe(images)
            heads = outputs.values() if isinstance(outputs, dict) else [outputs]
            loss = sum(o.float().square().mean() for o in heads)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return summarize(interleaved_seconds({"fp32": lambda: step(False), "bf16": lambda: step(True)}, repeats))


def choose_precision(model, image_size: int, batch_size: int, in_channels: int = 1,  # noqa: ANN001
                     hardware: Hardware | None = None) -> dict[str, Any]:
    """The decision for ``precision: auto`` with everything behind it, as ``precision.json`` records it:
    ``choice``, ``reason``, the hardware seen, the margin and (on a native-bf16 CPU) the timings."""
    hardware = hardware or detect_hardware()
    timings = measure_precision(model, image_size, batch_size, in_channels) if needs_measurement(hardware) else {}
    decision = decide(hardware, timings)
    return {"choice": decision.choice, "reason": decision.reason, **hardware.to_dict(),
            "slower_margin": SLOWER_MARGIN, **timings}
