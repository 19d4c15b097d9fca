"""Alpha values: the selection grid spaced as the training prior samples alpha, the forms an alpha
takes (a float for one weight, a tuple for ``K``; lists and tensors converted), and the checks of an
alpha against the range a model is trained on."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_DISTRIBUTION", "LOG_FLOOR", "alpha_grid", "alpha_key", "alpha_values", "format_alpha", "weight_ranges",
    "plain_alpha", "check_alpha",
]  # fmt: skip


#: the smallest positive alpha of a log-uniform prior and of its grid (lambda = 0.03 for bending). Below
#: about 1e-3 (lambda 3) the fields hardly differ from alpha 0's, so the decades under it act as prior
#: mass at the unregularised end: with 1e-5 (two of five decades) the conditioned model's alpha-0 end
#: comes within 0.010 lung NCC of a network trained at alpha 0 alone on the real lung pair (0.898
#: against 0.908; 0.883 with 1e-3), see README "The prior's floor". It is read when a prior or a grid
#: is made without an explicit ``log_floor``, so a script may set ``monai_cidir.engines.alphas.LOG_FLOOR``
#: before training (``benchmarks/real_pair.py --log-floor``); a trained model keeps its own in ``model.pt``.
LOG_FLOOR = 1e-5

#: the pipeline's alpha prior (``register_patient``, the bundle's ``alpha_distribution``): log alpha uniform
#: on [LOG_FLOOR, 1]; ``"uniform"`` is the paper's
DEFAULT_DISTRIBUTION = "log-uniform"


def alpha_grid(
    low: float = 0.0, high: float = 1.0, num: int = 21, distribution: str = "uniform", log_floor: float | None = None
) -> list[float]:
    """The sweep's alphas: ``num`` values over ``[low, high]``, spaced as the training prior samples them.

    ``"uniform"``: evenly spaced. ``"log-uniform"``: evenly spaced in log alpha over
    ``[max(low, log_floor), high]``; when ``low`` is below ``log_floor`` (e.g. 0) it is the first
    value and the other ``num - 1`` are log-spaced, so the unregularised end stays on the grid.
    ``log_floor=None`` reads :data:`LOG_FLOOR`.
    """
    log_floor = LOG_FLOOR if log_floor is None else float(log_floor)
    if num < 1:
        raise ValueError(f"num must be >= 1, found {num}")
    if distribution not in ("uniform", "log-uniform"):
        raise ValueError(f"distribution must be 'uniform' or 'log-uniform', found {distribution!r}")
    if num == 1:
        return [float(high)]
    if distribution == "log-uniform" and high > max(low, log_floor):
        lo = max(low, log_floor)
        head = [float(low)] if low < lo else []
        logs = np.exp(np.linspace(math.log(lo), math.log(high), num - len(head)))
        return head + [float(v) for v in logs]
    return [float(v) for v in np.linspace(low, high, num)]


def alpha_values(alpha) -> list[float]:
    """A float, a list, a tuple or a tensor of alphas as a list of floats (one per weight)."""
    if torch.is_tensor(alpha):
        return [float(v) for v in alpha.detach().reshape(-1).cpu()]
    return [float(v) for v in np.asarray(alpha, dtype=np.float64).reshape(-1)]


def alpha_key(alpha, num_weights: int = 1):
    """An alpha as the curve's rows keep it: a float for one weight, a tuple of floats for several."""
    values = alpha_values(alpha)
    if len(values) != num_weights:
        raise ValueError(f"expected {num_weights} weight(s) per alpha, found {alpha!r}")
    return values[0] if num_weights == 1 else tuple(values)


def format_alpha(alpha, spec: str = ".3g") -> str:
    """``0.1`` or ``[0.1, 0.03]``: an alpha (one weight, or a vector) for messages and titles."""
    values = alpha_values(alpha)
    text = [format(v, spec) for v in values]
    return text[0] if len(text) == 1 else "[" + ", ".join(text) + "]"


def weight_ranges(alpha_range: Sequence, num_weights: int | None = None) -> list[tuple[float, float]]:
    """``alpha_range`` as one ``(low, high)`` per weight: ``[low, high]`` applies to every weight,
    ``[[low_1, high_1], ..., [low_K, high_K]]`` gives each its own (``num_weights=None``: as many as given).

    Raises:
        ValueError: for a range that is not two numbers, or per-weight ranges of another count.
    """
    values = list(alpha_range)
    nested = bool(values) and all(isinstance(v, (list, tuple)) for v in values)
    k = (len(values) if nested else 1) if num_weights is None else num_weights
    if nested and len(values) != k:
        raise ValueError(f"alpha_range gives {len(values)} ranges for {k} weight(s): expected [low, high] or {k} pairs, found {alpha_range!r}")
    pairs = values if nested else [values] * k
    try:
        if any(len(pair) != 2 or any(isinstance(v, bool) for v in pair) for pair in pairs):
            raise ValueError
        return [(float(lo), float(hi)) for lo, hi in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"alpha_range must be [low, high] (or one such pair per weight), found {alpha_range!r}") from None


def plain_alpha(alpha) -> float | list[float]:
    """An alpha as stored in ``metrics.json`` and ``model.pt``: a float for one weight, a list for several."""
    values = alpha_values(alpha)
    return values[0] if len(values) == 1 else values


def check_alpha(alpha, alpha_range: Sequence, num_weights: int = 1) -> None:
    """A requested alpha must lie in the range the model was (or will be) trained on, one value per weight.

    Raises:
        ValueError: naming the alpha and the range.
    """
    if alpha is None:
        return
    try:
        values = alpha_values(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number (or one number per weight), found {alpha!r}") from None
    if len(values) != num_weights:
        raise ValueError(f"alpha {alpha!r} has {len(values)} value(s), but the network is conditioned on {num_weights} weight(s): give one per regularizer")
    for a, (lo, hi) in zip(values, weight_ranges(alpha_range, num_weights)):
        if not (math.isfinite(a) and lo - 1e-9 <= a <= hi + 1e-9):
            raise ValueError(
                f"alpha {alpha} is outside the range the network is trained on, [{lo:g}, {hi:g}]: it was never conditioned "
                "there, so its field would be an extrapolation. Choose an alpha in that range (or train with a wider alpha_range)."
            )
