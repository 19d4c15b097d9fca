"""A resumable training checkpoint as a handler: when and where the trainer's state is written.

MONAI's ``CheckpointSaver`` keeps model files; a per-patient cIDIR run needs one file that resumes
the run exactly: network, optimizer, schedule, affine, iteration, training seconds and the random
streams (the alpha generator, the point sampler's, torch's), which
:meth:`~monai_cidir.engines.CIDIRTrainer.checkpoint_state` gathers. :class:`TrainingCheckpoint`
decides when that state is written (every ``interval`` iterations, every ``every_s`` seconds, at the
end, and when SIGINT / SIGTERM stops training) and writes it atomically with ignite's ``DiskSaver``,
so a crash mid-write never leaves a truncated file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver

__all__ = ["TrainingCheckpoint"]


class TrainingCheckpoint:
    """Keeps one resumable checkpoint file of a :class:`~monai_cidir.engines.CIDIRTrainer`.

    While it is attached, the trainer catches SIGINT / SIGTERM: the running iteration finishes, the
    checkpoint is written, then the run stops (the trainer re-raises ``KeyboardInterrupt`` /
    ``SystemExit(128 + signum)``). :meth:`resume` loads the file into a fresh trainer, which then
    continues to the same result as an uninterrupted run.

    Args:
        path: the checkpoint file (its folder is created).
        interval: iterations between writes.
        every_s: seconds between writes (``None``: by iterations only; 0: every iteration).

    Example::

        >>> checkpoint = TrainingCheckpoint("outputs/p1/checkpoint.pt", interval=500, every_s=60.0)
        >>> checkpoint.attach(trainer)
        >>> checkpoint.resume(trainer)  # False when there is no file yet
        >>> trainer.run()
    """

    def __init__(self, path: str | os.PathLike, interval: int = 500, every_s: float | None = 60.0) -> None:
        if int(interval) < 1:
            raise ValueError(f"TrainingCheckpoint: interval must be >= 1 iteration, found {interval}")
        if every_s is not None and not every_s >= 0:
            raise ValueError(f"TrainingCheckpoint: every_s must be >= 0 seconds or None, found {every_s}")
        self.path = Path(path)
        self.interval = int(interval)
        self.every_s = None if every_s is None else float(every_s)
        self._saver: DiskSaver | None = None
        self._last = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        """Write on the trainer's iterations, on the clock, at the end and on a caught signal."""
        engine.add_event_handler(Events.STARTED, self._start_clock)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_clock_or_signal)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.checkpoint = self  # the trainer catches SIGINT / SIGTERM while a checkpoint is attached

    def save(self, engine: Engine) -> None:
        """Write the trainer's :meth:`checkpoint_state` to :attr:`path` (atomically)."""
        if self._saver is None:
            # every rank trains its own patients (multi_gpu_train.json): save on this rank, not only on rank 0
            self._saver = DiskSaver(str(self.path.parent), atomic=True, create_dir=True, require_empty=False, save_on_rank=idist.get_rank())
        self._saver(engine.checkpoint_state(), self.path.name)
        self._last = time.perf_counter()

    def resume(self, engine: Engine) -> bool:
        """Load :attr:`path` into the trainer if it exists; returns whether it did."""
        return engine.resume(self.path)

    def _start_clock(self, engine: Engine) -> None:
        self._last = time.perf_counter()

    def _on_clock_or_signal(self, engine: Engine) -> None:
        if getattr(engine, "signal_caught", None) is not None:
            self.save(engine)
            engine.terminate()
        elif self.every_s is not None and time.perf_counter() - self._last >= self.every_s:
            self.save(engine)
