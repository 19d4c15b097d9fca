# Copyright (c) monai_cidir contributors
# Licensed under the Apache License, Version 2.0

"""Inferers for networks of points (MONAI's ``Inferer`` protocol).

An INR is evaluated at lists of points, not on image patches: :class:`PointInferer` runs a
network over ``(N, D)`` points in chunks that bound memory, the point counterpart of MONAI's
``SlidingWindowInferer``. The bundle's ``inferer`` id is one; the trainer's ``train#inferer`` is
MONAI's ``SimpleInferer`` (one call per batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["PointInferer"]


class PointInferer(Inferer):
    """Call ``network(points, *args, **kwargs)`` on chunks of at most ``chunk_size`` points.

    Positional tensor arguments with one row per point (the same first dimension as the
    points, e.g. one alpha per point) are cut into the same chunks; other arguments (one alpha
    for all points, keywords) are passed unchanged. The outputs are concatenated along the
    first dimension: a tensor, or a tuple of tensors (``None`` entries stay ``None``).

    Args:
        chunk_size: points per network call (bounds memory; positive).
        device: where each chunk's output is moved before concatenation (``None``: where the
            network puts it), e.g. ``"cpu"`` to keep GPU memory to one chunk.

    Raises:
        ValueError: for a chunk size below 1, or points that are not a 2-D tensor.

    Example::

        >>> inferer = PointInferer(chunk_size=4096)
        >>> u = inferer(torch.rand(10000, 3), ConditionedINR(), 0.3)  # three calls
        >>> u.shape
        torch.Size([10000, 3])
    """

    def __init__(self, chunk_size: int = 65536, device: str | torch.device | None = None) -> None:
        super().__init__()
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of points, found {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.device = None if device is None else torch.device(device)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``network`` over ``inputs`` (N, D) in chunks; returns the concatenated output."""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2:
            raise ValueError(f"PointInferer expects points as a (N, D) tensor, found {getattr(inputs, 'shape', type(inputs).__name__)}")
        n = inputs.shape[0]
        if n <= self.chunk_size:
            return self._to_device(network(inputs, *args, **kwargs))
        outputs = []
        for begin in range(0, n, self.chunk_size):
            end = min(n, begin + self.chunk_size)
            chunk_args = [a[begin:end] if _per_point(a, n) else a for a in args]
            outputs.append(self._to_device(network(inputs[begin:end], *chunk_args, **kwargs)))
        return _concatenate(outputs)

    def _to_device(self, out: Any) -> Any:
        if self.device is None:
            return out
        if isinstance(out, tuple):
            return tuple(None if o is None else o.to(self.device) for o in out)
        return out.to(self.device)


def _per_point(arg: Any, n: int) -> bool:
    return isinstance(arg, torch.Tensor) and arg.ndim >= 1 and arg.shape[0] == n and n > 1


def _concatenate(outputs: list) -> Any:
    if isinstance(outputs[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)
