"""The Lightning callbacks of a run: per-epoch metrics rows, best.pt, stopping on request (pruning), and the
progress bar (counting epochs as the log does, drawn on the terminal only).

Lightning is imported only inside :func:`make_callbacks` and :func:`progress_bars`, so importing this module
(and the CLI) stays fast.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lungscreen import interrupts
from lungscreen.training.run_context import is_finite

if TYPE_CHECKING:
    from lungscreen.training.run_context import RunContext


def make_callbacks():  # noqa: ANN201 - defined lazily so importing this module does not import Lightning
    import lightning as L

    class EpochRecorder(L.Callback):
        """Times each epoch and appends its row to metrics.csv (rank 0), forwarding it to a tracker."""

        def __init__(self, run: RunContext, stage_index: int, offset: int, world_size: int) -> None:
            self.run, self.stage_index, self.offset, self.world_size = run, stage_index, offset, world_size
            self._start = self._train_seconds = 0.0
            self._images = 0

        def on_train_epoch_start(self, trainer, module) -> None:  # noqa: ANN001
            self._start, self._images = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self._images += len(batch["image"]) * self.world_size

        def on_validation_start(self, trainer, module) -> None:  # noqa: ANN001
            if not trainer.sanity_checking:
                self._train_seconds = time.perf_counter() - self._start

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            if trainer.sanity_checking or not module.last_validation:
                return
            seconds = time.perf_counter() - self._start
            groups = trainer.optimizers[0].param_groups
            row = {"stage": self.stage_index, "stage_name": module.stage.name, "epoch": trainer.current_epoch,
                   "run_epoch": self.offset + trainer.current_epoch, "image_size": module.stage.image_size,
                   "lr_first": groups[0]["lr"], "lr_last": groups[-1]["lr"], **module.last_validation,
                   "train_seconds": round(self._train_seconds, 3), "epoch_seconds": round(seconds, 3),
                   "images_per_s": round(self._images / self._train_seconds, 2) if self._train_seconds else float("nan")}
            self.run.record_epoch(row)

    class BestCheckpoint(L.Callback):
        """Keeps best.pt: the epoch with the best ``monitor`` figure, ties broken by the lower val loss, among the
        stages validated like the last one (:meth:`RunContext.chooses_best`)."""

        def __init__(self, run: RunContext, stage_index: int) -> None:
            self.run, self.stage_index = run, stage_index
            self.competes = run.chooses_best(stage_index)

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            if trainer.sanity_checking or not module.last_validation or not self.competes:
                return
            metric, mode = self.run.monitor
            value = module.last_validation.get(metric, float("nan"))
            tie = module.last_validation.get("val/loss", float("inf"))
            if not is_finite(value):
                return
            best = self.run.best
            sign = 1.0 if mode == "max" else -1.0
            if best and (sign * value, -tie) <= (sign * best["value"], -best["tie"]):
                return
            self.run.save_best(module, value=value, tie=tie, epoch=trainer.current_epoch, stage_index=self.stage_index)

    class StopOnRequest(L.Callback):
        """Stops the trainer when the run was asked to stop (a pruned search trial)."""

        def __init__(self, run: RunContext) -> None:
            self.run = run

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            if self.run.stop_requested:
                trainer.should_stop = True

    class StopOnSignal(L.Callback):
        """Stops the run between batches when Ctrl-C or SIGTERM arrived (see :mod:`lungscreen.interrupts`)."""

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            interrupts.check()

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            interrupts.check()

    return EpochRecorder, BestCheckpoint, StopOnRequest, StopOnSignal


def show_progress(quiet: bool) -> bool:
    """Whether a run draws progress bars: not asked to be quiet, and stderr (where bars draw) is a terminal."""
    return not quiet and sys.stderr.isatty()


def progress_bars(stage_name: str, epochs: int, quiet: bool) -> list[Any]:
    """The stage's progress bar as a Lightning callback (none when :func:`show_progress` says no, for
    Lightning refuses a bar callback when ``enable_progress_bar`` is off)."""
    if not show_progress(quiet):
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    class EpochProgressBar(TQDMProgressBar):
        """Lightning's tqdm bar, counting epochs from 1 as log.txt does (``[all] epoch 2/3``), and drawn on the
        terminal past the run log, so its redraws never reach log.txt."""

        def __init__(self, stage_name: str, epochs: int) -> None:
            super().__init__()
            self.stage_name, self.epochs = stage_name, epochs

        def init_sanity_tqdm(self):  # noqa: ANN202 - Lightning's Tqdm
            with _drawing_on_terminal():
                return super().init_sanity_tqdm()

        def init_train_tqdm(self):  # noqa: ANN202
            with _drawing_on_terminal():
                return super().init_train_tqdm()

        def init_validation_tqdm(self):  # noqa: ANN202
            with _drawing_on_terminal():
                return super().init_validation_tqdm()

        def on_train_epoch_start(self, trainer, *args: Any) -> None:  # noqa: ANN001
            super().on_train_epoch_start(trainer, *args)
            epoch = trainer.current_epoch + 1
            self.train_progress_bar.set_description(f"[{self.stage_name}] epoch {epoch}/{self.epochs}")

    return [EpochProgressBar(stage_name, epochs)]


@contextlib.contextmanager
def _drawing_on_terminal() -> Iterator[None]:
    """Lightning makes its bars on ``sys.stdout``: point that at the terminal while a bar is made (the bar
    keeps the stream it was made with)."""
    from lungscreen.training.run_folder import terminal_stream

    stdout, sys.stdout = sys.stdout, terminal_stream()
    try:
        yield
    finally:
        sys.stdout = stdout
