"""Distributed cohorts: ranks from ``torchrun``'s environment, the per-rank device, and the process
group joined only to gather the cohort table (``multi_gpu_train.json`` wires
:func:`init_distributed` / :func:`destroy_distributed`; :func:`~monai_cidir.engines.bundle.train_cohort`
partitions the patients).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path

import torch

__all__ = ["GATHER_TIMEOUT", "rank_and_world_size", "init_distributed", "destroy_distributed"]

logger = logging.getLogger("monai_cidir.engines")

# Why the process group is created only after training: MONAI's cumulative metrics (DiceMetric,
# and monai_cidir's TRE / Jacobian metrics) all-gather their buffers whenever a default process
# group exists. With one patient per rank that would average different patients' metrics (and
# hang when ranks hold different numbers of patients). So ranks learn their rank from torchrun's
# environment, train without a group, and join NCCL/Gloo only to gather the cohort table.
GATHER_TIMEOUT = datetime.timedelta(hours=48)
"""How long the first rank to finish waits for the others (ranks may hold unequal work)."""


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``: of the process group if one exists, else of a ``torchrun`` launch.

    Returns:
        ``(0, 1)`` for a plain (non-``torchrun``) process.

    Example::

        >>> rank_and_world_size()  # a plain python process  # doctest: +SKIP
        (0, 1)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> torch.device:
    """This rank's device for a ``torchrun`` launch (``multi_gpu_train.json``'s ``initialize``).

    Checks the ``torchrun`` environment and makes ``cuda:<LOCAL_RANK>`` the current CUDA
    device; the NCCL (GPU) or Gloo (CPU) process group is created by :func:`train_cohort` once
    the rank's patients are done (see the note above :data:`GATHER_TIMEOUT`).

    Returns:
        ``cuda:<LOCAL_RANK>`` or ``cpu``.

    Raises:
        RuntimeError: when the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
            ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is missing.

    Example::

        >>> device = init_distributed()  # under torchrun --nproc_per_node=2  # doctest: +SKIP
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu_train.json expects a torchrun launch; the environment lacks {missing}. Launch with "
            "`torchrun --standalone --nnodes=1 --nproc_per_node=N -m monai.bundle run training --config_file "
            "\"['.../train.json','.../multi_gpu_train.json']\"`, or drop multi_gpu_train.json for one process."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank, world = rank_and_world_size()
    logger.info("rank %d of %d on %s", rank, world, device)
    return device


def _join_process_group(backend: str | None = None) -> None:
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        torch.distributed.init_process_group(backend=backend, timeout=GATHER_TIMEOUT)


def destroy_distributed() -> None:
    """Tear down the process group if one exists (``multi_gpu_train.json``'s ``finalize``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _wait_for_file(path: Path, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_and_world_size()[0]} waited {timeout_s:.0f} s for rank 0 to write {path}")
        time.sleep(poll_s)
