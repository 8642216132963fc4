"""Stopping and restarting a training run: SIGINT/SIGTERM stop it after the current step with a checkpoint
(``StopSignals``, ``TrainingInterrupted``), what an earlier run left in an output folder (``previous_run``,
``clear_previous_run``) and where a run starts (``resume_point``). Both trainers (the U-Net's
``dreambooth.py`` and the DiT's ``dit.py``) use them."""
from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path

from . import checkpoint
from .config import ConfigError

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
    for adapter in (out / "adapter.safetensors", *out.glob("adapter-*.safetensors"), out / "losses.json"):
        adapter.unlink(missing_ok=True)  # the adapter, a second method's adapter (DiT runs), the DiT's losses
    for part in ("checkpoints", "validation", "logs"):
        shutil.rmtree(out / part, ignore_errors=True)


def resume_point(cfg, out: Path, clear: bool = True) -> Path | None:
    """The checkpoint a run in ``out`` starts from (None: from step 0), checked before any work.

    ``cfg.resume``: "latest" (the newest checkpoint under ``out/checkpoints``; none there starts afresh) or a
    checkpoint folder. Without it, a run already in ``out`` (an adapter or checkpoints) is a ``ConfigError``
    unless ``cfg.overwrite``, which removes it (only where ``clear``: one process of several clears).
    """
    if cfg.resume:
        found = checkpoint.latest(out / "checkpoints") if cfg.resume == "latest" else Path(cfg.resume)
        if found is None:
            logger.info("resume=latest: no checkpoint under %s, starting afresh", out / "checkpoints")
        elif not (found / checkpoint.STATE).is_file():
            raise ConfigError(f"resume: {found} is not a complete checkpoint (resume = \"latest\" or a "
                              f"checkpoint folder such as {out / 'checkpoints' / 'step-000100'})")
        return found
    if previous_run(out):
        if not cfg.overwrite:
            found = ", ".join(p.name for p in previous_run(out)[:3])
            raise ConfigError(f"output_dir {out} already holds a run ({found}): --resume=latest continues it, "
                              f"--overwrite replaces it, or choose another --output_dir")
        if clear:
            logger.info("overwrite: removing the previous run in %s", out)
            clear_previous_run(out)
    return None
