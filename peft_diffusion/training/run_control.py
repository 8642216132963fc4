"""Stopping and restarting a training run: SIGINT/SIGTERM stop it after the current step with a checkpoint
(``StopSignals``, ``TrainingInterrupted``), and what an earlier run left in an output folder
(``previous_run``, ``clear_previous_run``)."""
from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path

from . import checkpoint

logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training. ``checkpoint`` is the checkpoint of the step reached (written on
    the way out) or the newest one before it (None: nothing to resume from). A KeyboardInterrupt, so code
    catching only ``Exception`` lets it through, as it would Ctrl-C."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # the shell's code for "killed by this signal"
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint to resume from"
        super().__init__(f"{name} at step {step}: {saved}")


class StopSignals:
    """While active, SIGINT and SIGTERM ask the training loop to stop after its current step (``signum``);
    while not ``armed`` (before the first step, during the export) or on a second signal, they raise
    ``TrainingInterrupted`` at once. Handlers can only be set from the main thread: elsewhere this does
    nothing and signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.armed, self.step, self.last_checkpoint, self._old = 0, False, 0, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame):
        if not self.armed or self.signum:
            raise TrainingInterrupted(signum, self.step, self.last_checkpoint)
        self.signum = signum
        logger.warning("%s: stopping after step %d (again to stop at once)", signal.Signals(signum).name,
                       self.step + 1)


def previous_run(out: Path) -> list[Path]:
    """What a finished or interrupted run left in ``out``: its adapter and its checkpoints."""
    return [p for p in (out / "adapter.safetensors",) if p.exists()] + checkpoint.checkpoints(out / "checkpoints")


def clear_previous_run(out: Path) -> None:
    """Remove the parts of a run in ``out`` that a new one writes (never the folder itself: it may hold more)."""
    (out / "adapter.safetensors").unlink(missing_ok=True)
    for part in ("checkpoints", "validation", "logs"):
        shutil.rmtree(out / part, ignore_errors=True)
