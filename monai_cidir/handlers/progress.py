# Copyright (c) monai_cidir contributors
# Licensed under the Apache License, Version 2.0

"""The training progress bar as a handler (attaches like any MONAI handler)."""

from __future__ import annotations

__all__ = ["TrainingProgressBar"]


class TrainingProgressBar:
    """Ignite ``ProgressBar`` (tqdm) showing the training loss; attaches like a MONAI handler.

    A fresh ``ProgressBar`` is made at every :meth:`attach`, so one ``TrainingProgressBar`` can
    serve the trainers of several patients one after another.

    Args:
        persist: keep the finished bar on screen.

    Example::

        >>> register_patient(item, "outputs", handlers=[TrainingProgressBar()])
    """

    def __init__(self, persist: bool = False) -> None:
        self.persist = persist

    def attach(self, engine) -> None:
        """Attach a fresh ``ProgressBar`` to ``engine``."""
        from ignite.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda x: {"loss": x["loss"]})
