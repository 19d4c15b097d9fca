"""Which alphas the selection scores: a small search strategy.

The training prior owns alpha: it gives the first grid, spaced as it samples alpha (one weight:
``prior.grid(num_alphas)``; ``K`` weights: a product grid of ``max(3, floor(num_alphas ** (1/K)))``
values per weight). :class:`AlphaSearch` then refines around the key metric's choice, a
golden-section search for one weight, rounds of midpoints for ``K`` weights. Every alpha it asks
for is scored through the evaluator's engine (:meth:`AlphaSelectionEvaluator.score_alphas`), so
handlers and the key metric (:class:`~monai_cidir.handlers.AlphaChoice`) see each one, and the key
metric, not the search, decides.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from monai_cidir.engines.alphas import alpha_grid, alpha_key

__all__ = ["AlphaSearch"]


class AlphaSearch:
    """The alphas the selection scores: a first grid from the training prior, then refinement.

    Args:
        num_alphas: size of the first grid (default 21); for ``K`` weights,
            ``max(3, floor(num_alphas ** (1 / K)))`` values per weight (4 x 4 for 21 and ``K = 2``).
            0: no search (``select_and_export`` then exports at a fixed ``alpha``).
        alphas: an explicit first grid instead (floats, or ``K``-vectors).
        golden_section_steps: one weight: extra evaluations of a golden-section search between the
            chosen grid alpha's neighbours (0: none).
        refine_rounds: ``K`` weights: rounds of refinement around the chosen vector. Each scores,
            per weight, the chosen value and the midpoints towards its evaluated neighbours
            (geometric on a log-uniform axis), so the step halves every round; at most
            ``3^K - 1`` new vectors per round.

    Example::

        >>> evaluator = AlphaSelectionEvaluator(model, item, prior=prior,
        ...                                     search=AlphaSearch(num_alphas=11, golden_section_steps=4))
        >>> evaluator.run().alpha
    """

    def __init__(
        self, num_alphas: int = 21, alphas: Sequence | None = None, golden_section_steps: int = 0, refine_rounds: int = 1
    ) -> None:
        if alphas is None and int(num_alphas) < 0:
            raise ValueError(f"num_alphas must be >= 0 (or give alphas=[...]), found {num_alphas}")
        if int(golden_section_steps) < 0 or int(refine_rounds) < 0:
            raise ValueError(f"golden_section_steps and refine_rounds must be >= 0, found {golden_section_steps}, {refine_rounds}")
        self.num_alphas = int(num_alphas) if alphas is None else len(alphas)
        self.alphas = None if alphas is None else list(alphas)
        self.golden_section_steps = int(golden_section_steps)
        self.refine_rounds = int(refine_rounds)

    def __repr__(self) -> str:
        grid = f"alphas={self.alphas}" if self.alphas is not None else f"num_alphas={self.num_alphas}"
        return f"AlphaSearch({grid}, golden_section_steps={self.golden_section_steps}, refine_rounds={self.refine_rounds})"

    def first(self, prior, num_weights: int = 1) -> list:
        """The first grid (floats for one weight, tuples for ``K``), spaced as ``prior`` samples alpha.

        Args:
            prior: the training prior (:class:`~monai_cidir.engines.AlphaPrior`); ``None`` for one
                weight: the paper's uniform prior on ``[0, 1]``.
            num_weights: ``K``, the weights the model is conditioned on.

        Raises:
            ValueError: for ``K > 1`` without a prior (the range of each weight is unknown).
        """
        if self.alphas is not None:
            return [alpha_key(a, num_weights) for a in self.alphas]
        if num_weights == 1:
            return prior.grid(self.num_alphas) if prior is not None else alpha_grid(0.0, 1.0, self.num_alphas)
        if prior is None:
            raise ValueError(f"the model is conditioned on {num_weights} weights: give the training prior (prior=AlphaPrior(...)) or the alpha vectors to score")
        per_axis = max(3, int(math.floor(self.num_alphas ** (1.0 / num_weights) + 1e-9)))
        return [tuple(v) for v in itertools.product(*prior.axis_grids(per_axis))]

    def refine(self, evaluator) -> None:
        """Score more alphas around the key metric's choice, through ``evaluator.score_alphas``."""
        if not evaluator.curve.rows:
            return
        if evaluator.num_weights > 1:
            for _ in range(self.refine_rounds):
                if not self._refine_vectors(evaluator):
                    break
        elif self.golden_section_steps > 0 and len(evaluator.curve.rows) > 1:
            self._golden_section(evaluator)

    # ------------------------------------------------------------------ K weights
    def _refine_vectors(self, evaluator) -> int:
        """One round around the chosen vector; returns how many new vectors were scored."""
        best = evaluator.choice.best["alpha"]
        distributions = list(getattr(evaluator.prior, "distributions", ["uniform"] * len(best)))
        candidates = []
        for i, b in enumerate(best):
            values = sorted({r["alpha"][i] for r in evaluator.curve.rows})
            j = values.index(b)
            axis = [b]
            if j > 0:
                axis.append(_midpoint(values[j - 1], b, distributions[i]))
            if j + 1 < len(values):
                axis.append(_midpoint(b, values[j + 1], distributions[i]))
            candidates.append(axis)
        seen = {r["alpha"] for r in evaluator.curve.rows}
        new = [v for v in itertools.product(*candidates) if v not in seen]
        if new:
            evaluator.score_alphas(new)
        return len(new)

    # ------------------------------------------------------------------ one weight
    def _golden_section(self, evaluator) -> None:
        """Golden-section search between the chosen grid alpha's neighbours."""
        rows = sorted(evaluator.curve.rows, key=lambda r: r["alpha"])
        chosen = evaluator.choice.best["alpha"]
        i = next(k for k, r in enumerate(rows) if r["alpha"] == chosen)
        lo, hi = rows[max(0, i - 1)]["alpha"], rows[min(len(rows) - 1, i + 1)]["alpha"]
        if hi <= lo:
            return
        g = (math.sqrt(5) - 1) / 2
        choice = evaluator.choice
        cache: dict[float, float] = {}

        def f(a: float) -> float:
            if a not in cache:
                evaluator.score_alphas([a])
                row = choice.rows[-1]  # the key metric's record holds its score
                cache[a] = row[choice.score_key] if choice.allowed(row) else -math.inf
            return cache[a]

        a, b = lo, hi
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = f(c), f(d)
        while len(cache) < self.golden_section_steps:
            if fc > fd:  # the maximum lies in [a, d]
                b, d, fd = d, c, fc
                c = b - g * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + g * (b - a)
                fd = f(d)


def _midpoint(a: float, b: float, distribution: str) -> float:
    """Between two alphas of one weight, as its prior spaces them (geometric for log-uniform)."""
    if distribution == "log-uniform" and a > 0:
        return math.sqrt(a * b)
    return 0.5 * (a + b)
