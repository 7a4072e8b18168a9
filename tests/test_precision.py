"""``precision: auto`` decides from the hardware, with a load-proof measurement as a veto only."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lungscreen.training import precision
from lungscreen.training.config import from_dict, load_config
from lungscreen.training.engine import train
from lungscreen.training.precision import Hardware, decide, interleaved_seconds, needs_measurement, summarize
from lungscreen.training.stage import _choose_precision
from training_fixtures import make_manifest, tiny_recipe, write_recipe

AMX = Hardware(cpu_flags=("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"), cpu_capability="AVX512",
               onednn=True)
AVX512_BF16 = Hardware(cpu_flags=("avx512_bf16", "avx512f", "avx2"), cpu_capability="AVX512", onednn=True)
NO_BF16 = Hardware(cpu_flags=("avx512f", "avx2"), cpu_capability="AVX512", onednn=True)


def timings(ratio: float) -> dict:
    return {"fp32_step_s": 1.0, "bf16_step_s": ratio, "bf16_ratio": ratio, "pairs": 5}


def test_amx_keeps_bf16_unless_measured_clearly_slower() -> None:
    assert needs_measurement(AMX) and needs_measurement(AVX512_BF16)
    assert decide(AMX) == precision.Decision("bf16", "the CPU has amx_bf16+amx_tile+avx512_bf16")
    assert decide(AMX, timings(0.55)).choice == "bf16"
    assert decide(AMX, timings(1.15)).choice == "bf16"  # a little slower is within the noise, not a reason
    slower = decide(AMX, timings(1.4))
    assert slower.choice == "32" and "1.40 x fp32" in slower.reason and "25% margin" in slower.reason


def test_bf16_in_the_vector_unit_only_keeps_fp32_unless_bf16_is_clearly_faster() -> None:
    assert decide(AVX512_BF16).choice == "32" and "no AMX" in decide(AVX512_BF16).reason
    assert decide(AVX512_BF16, timings(0.7)).choice == "bf16"  # 1/0.7 = 1.43 x faster: beyond the margin
    assert decide(AVX512_BF16, timings(0.85)).choice == "32"  # 1.18 x faster: within the noise
    assert decide(AVX512_BF16, timings(1.15)).choice == "32"
    assert decide(AVX512_BF16, timings(0.7), margin=0.5).choice == "32"


def test_without_native_bf16_it_is_fp32_whatever_a_timing_says() -> None:
    for hardware in (NO_BF16, Hardware(cpu_flags=("amx_bf16",), cpu_capability="AVX512", onednn=False)):
        assert not needs_measurement(hardware)
        assert decide(hardware, timings(0.5)).choice == "32"
    assert "no native bf16" in decide(NO_BF16).reason


def test_a_gpu_follows_its_bf16_support_without_measuring() -> None:
    gpu = Hardware(cpu_flags=(), cpu_capability="AVX2", onednn=True, gpu="A100", gpu_bf16=True)
    assert not needs_measurement(gpu) and decide(gpu).choice == "bf16"
    old_gpu = Hardware(cpu_flags=("amx_bf16",), cpu_capability="AVX2", onednn=True, gpu="T4", gpu_bf16=False)
    assert decide(old_gpu).choice == "32" and "lacks bf16" in decide(old_gpu).reason


class LoadedMachine:
    """A clock and two fake training steps; a load makes every step that starts in [start, end) 3x slower."""

    def __init__(self, fp32: float, bf16: float, start: float, end: float) -> None:
        self.now, self.start, self.end = 0.0, start, end
        self.steps = {"fp32": lambda: self._run(fp32), "bf16": lambda: self._run(bf16)}

    def _run(self, seconds: float) -> None:
        self.now += seconds * (3.0 if self.start <= self.now < self.end else 1.0)

    def clock(self) -> float:
        return self.now


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(1.0, 0.8, "bf16"), (1.0, 1.5, "32")])
def test_a_load_during_the_measurement_does_not_flip_the_decision(fp32: float, bf16: float, expected: str) -> None:
    # every load window, from a blip to most of the measurement, wherever it starts
    edges = [i * 0.25 for i in range(int(4 * 3 * 6 * (fp32 + bf16)))]
    for start, end in itertools.combinations(edges, 2):
        machine = LoadedMachine(fp32, bf16, start, end)
        measured = summarize(interleaved_seconds(machine.steps, repeats=5, clock=machine.clock))
        assert decide(AMX, measured).choice == expected, (start, end, measured["bf16_ratio"])
    # the same load over the second half, measured the old way (all fp32 steps, then all bf16), would flip it
    if expected == "bf16":
        machine = LoadedMachine(fp32, bf16, start=6 * fp32, end=1e9)
        old = {name: [_timed(machine, step) for _ in range(6)][1:] for name, step in machine.steps.items()}
        assert min(old["bf16"]) / min(old["fp32"]) > 1 + precision.SLOWER_MARGIN


def _timed(machine: LoadedMachine, step) -> float:  # noqa: ANN001
    start = machine.clock()
    step()
    return machine.clock() - start


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "cpuinfo"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
                   "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    assert precision.cpu_flags(x86) == ("amx_bf16", "amx_tile", "avx512_bf16", "amx_int8", "avx512f", "avx2")
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 svebf16 i8mm\n")
    assert precision.cpu_flags(arm) == ("bf16", "svebf16", "sve")
    assert isinstance(precision.cpu_flags(tmp_path / "absent"), tuple)  # PyTorch's probes instead


def test_measure_precision_interleaves_real_steps() -> None:
    from lungscreen.models import create

    measured = precision.measure_precision(create("covidnet_tiny"), image_size=32, batch_size=2, repeats=3)
    assert measured["pairs"] == 3 and len(measured["fp32_steps_s"]) == len(measured["bf16_steps_s"]) == 3
    assert measured["fp32_step_s"] > 0 and measured["bf16_ratio"] > 0


def _context(tmp_path: Path, wanted: str) -> SimpleNamespace:
    config = SimpleNamespace(precision=wanted, model=SimpleNamespace(in_channels=1))
    return SimpleNamespace(config=config, env=SimpleNamespace(is_zero=True, world_size=1))


def _stage_and_plan() -> tuple[SimpleNamespace, SimpleNamespace]:
    return SimpleNamespace(image_size=32), SimpleNamespace(data=SimpleNamespace(batch_size=4))


def test_auto_records_its_reason_and_a_resume_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    calls = []
    monkeypatch.setattr(precision, "detect_hardware", lambda: AMX)
    monkeypatch.setattr(precision, "measure_precision", lambda *args, **kwargs: calls.append(args) or timings(0.6))
    stage, plan = _stage_and_plan()
    assert _choose_precision(_context(tmp_path, "auto"), tmp_path, object(), stage, plan) == "bf16"
    record = json.loads((tmp_path / "precision.json").read_text())
    assert record["choice"] == "bf16" and record["reason"].startswith("the CPU has amx_bf16")
    assert record["cpu_flags"] == list(AMX.cpu_flags) and record["bf16_ratio"] == 0.6
    assert record["slower_margin"] == precision.SLOWER_MARGIN
    assert "precision auto: bf16: the CPU has amx_bf16" in capsys.readouterr().out
    assert _choose_precision(_context(tmp_path, "auto"), tmp_path, object(), stage, plan) == "bf16"
    assert len(calls) == 1  # the resumed stage keeps its decision


@pytest.mark.parametrize(("wanted", "expected"), [("bf16", "bf16"), ("32", "32")])
def test_a_pinned_precision_skips_the_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wanted: str,
                                                  expected: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pinned precision must not measure")

    monkeypatch.setattr(precision, "detect_hardware", refuse)
    monkeypatch.setattr(precision, "measure_precision", refuse)
    stage, plan = _stage_and_plan()
    assert _choose_precision(_context(tmp_path, wanted), tmp_path, object(), stage, plan) == expected
    assert not (tmp_path / "precision.json").exists()


def test_set_precision_on_the_command_line_pins_it(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "synth", per_class=4)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(manifest, precision="auto"))
    assert load_config(str(recipe), ["precision=bf16"]).precision == "bf16"
    assert load_config(str(recipe), []).precision == "auto"


def test_a_run_with_auto_writes_the_decision_into_the_stage(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "synth", per_class=10)
    recipe = tiny_recipe(manifest, precision="auto", test=False)
    recipe["stages"] = recipe["stages"][:1]
    result = train(from_dict(recipe), out=tmp_path / "run", quiet=True)
    record = json.loads((result.run_dir / "stages" / "00-head" / "precision.json").read_text())
    assert record["choice"] in ("32", "bf16") and record["reason"]
    assert {"cpu_flags", "cpu_capability", "onednn", "slower_margin"} <= set(record)
    assert result.summary["stages"][0]["precision"] == record["choice"]
    said = f"precision auto: {'bf16' if record['choice'] == 'bf16' else 'fp32'}: {record['reason']}"
    assert said in (result.run_dir / "log.txt").read_text()
