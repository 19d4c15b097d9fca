"""Alpha values: the selection grid spaced as the training prior samples alpha, and the forms an
alpha takes (a float for one weight, a tuple for ``K``; lists and tensors converted)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["DEFAULT_DISTRIBUTION", "LOG_FLOOR", "alpha_grid", "alpha_key", "alpha_values", "format_alpha"]


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
