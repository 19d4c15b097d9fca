"""The key metric of the alpha search: it scores every evaluated alpha and decides which one wins.

:class:`~monai_cidir.engines.AlphaSelectionEvaluator` evaluates one alpha per iteration and passes
every alpha, the refinement's too, through the engine. :class:`AlphaChoice` is attached as the
evaluator's key metric: it collects each iteration's output (``alpha``, the score, ``folding``)
from the start of the search (:attr:`AlphaSearchEvents.SEARCH_STARTED`, not every engine run, since
a refinement round is a further run) and, after each run, reports the chosen alpha's score as the
key metric. The evaluator's result is this metric's :attr:`AlphaChoice.best`. To select by another
rule, give the evaluator another key metric (a subclass, or other ``score_key`` / ``tie_tolerance``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ignite.engine import EventEnum, Events
from ignite.metrics import Metric
from ignite.metrics.metric import MetricUsage

__all__ = ["AlphaChoice", "AlphaSearchEvents"]


class AlphaSearchEvents(EventEnum):
    """Events of the alpha search (registered on :class:`~monai_cidir.engines.AlphaSelectionEvaluator`).

    ``SEARCH_STARTED`` fires once per search, before the first grid is scored; refinement rounds
    are further engine runs of the same search. ``SEARCH_COMPLETED`` fires once, after the key metric
    has chosen and ``evaluator.curve`` is final (the export handler writes the outputs then).
    """

    SEARCH_STARTED = "search_started"
    SEARCH_COMPLETED = "search_completed"


class AlphaChoice(Metric):
    """Key metric of the alpha search: the best score over every alpha scored so far in the search.

    Rule (the paper's, with a tie rule): the highest ``score_key`` wins; scores within
    ``tie_tolerance`` of the highest are ties, and the smoother field wins them: the larger alpha,
    or for ``K`` weights the larger ``sum_r alpha_r / high_r`` (``high_r``: the largest value of
    weight ``r`` scored). With ``no_folding=True`` only alphas without folding compete (if every
    alpha folds, those with the least folding).

    Args:
        score_key: the per-alpha score in the engine's output (default ``"dice"``, the lung Dice).
        tie_tolerance: score differences up to this count as ties (default 1e-3 lung Dice: with
            longer training the Dice keeps creeping up by several 1e-4 as alpha falls while the
            landmark TRE gets worse; ``benchmarks/selection_rule.py`` measures this, README
            "Performance").
        no_folding: only alphas with zero folding compete.
        output_transform: maps the engine's output to a dict with ``alpha``, ``folding`` and the score.

    Example::

        >>> evaluator = AlphaSelectionEvaluator(model, item, key_metric=AlphaChoice(tie_tolerance=2e-3))
        >>> evaluator.run().alpha  # the alpha this metric chose
    """

    def __init__(
        self,
        score_key: str = "dice",
        tie_tolerance: float = 1e-3,
        no_folding: bool = False,
        output_transform: Callable = lambda x: x,
    ) -> None:
        if not tie_tolerance >= 0:
            raise ValueError(f"tie_tolerance must be >= 0, found {tie_tolerance}")
        self.score_key = str(score_key)
        self.tie_tolerance = float(tie_tolerance)
        self.no_folding = bool(no_folding)
        self.rows: list[dict] = []
        super().__init__(output_transform=output_transform)

    @property
    def name(self) -> str:
        """The key metric's name in ``engine.state.metrics``: ``selected_<score_key>``."""
        return f"selected_{self.score_key}"

    def reset(self) -> None:
        self.rows = []

    def update(self, output) -> None:
        if self.score_key not in output:
            raise KeyError(f"AlphaChoice(score_key={self.score_key!r}): the engine output has no {self.score_key!r}, only {sorted(output)}")
        row = {k: output[k] for k in ("alpha", "folding", "seconds", "points") if k in output}
        row[self.score_key] = float(output[self.score_key])
        self.rows.append(row)

    def iteration_completed(self, engine) -> None:
        """Record the iteration's output (a dict: ignite's tuple conversion by ``required_output_keys`` is not wanted)."""
        self.update(self._output_transform(engine.state.output))

    def compute(self) -> float:
        return self.choose(self.rows)[self.score_key]

    @property
    def best(self) -> dict:
        """The chosen row (alpha, score, folding, ...) of every alpha scored in this search."""
        return self.choose(self.rows)

    def allowed(self, row: dict) -> bool:
        """Whether a row competes under the folding rule on its own (``no_folding``: zero folding)."""
        return (not self.no_folding) or row.get("folding", 0.0) <= 0.0

    def choose(self, rows: Sequence[dict]) -> dict:
        """The winning row of ``rows`` under this metric's rule.

        Raises:
            ValueError: when ``rows`` is empty.
        """
        if not rows:
            raise ValueError("AlphaChoice: no alpha was scored")
        pool = list(rows)
        if self.no_folding:
            clean = [r for r in pool if r.get("folding", 0.0) <= 0.0]
            least = min(r.get("folding", 0.0) for r in pool)
            pool = clean or [r for r in pool if r.get("folding", 0.0) <= least]
        top = max(r[self.score_key] for r in pool)
        ties = [r for r in pool if r[self.score_key] >= top - self.tie_tolerance]
        highs = _highs(rows)
        return max(ties, key=lambda r: _smoothness(r["alpha"], highs))

    def attach(self, engine, name: str, usage=None) -> None:
        """Attach for the whole search: reset at ``SEARCH_STARTED``, update every iteration, report after every run."""
        if usage is None:
            usage = MetricUsage(AlphaSearchEvents.SEARCH_STARTED, Events.EPOCH_COMPLETED, Events.ITERATION_COMPLETED)
        super().attach(engine, name, usage)


def _values(alpha) -> tuple[float, ...]:
    return tuple(float(a) for a in alpha) if isinstance(alpha, (tuple, list)) else (float(alpha),)


def _highs(rows: Sequence[dict]) -> list[float]:
    columns = zip(*(_values(r["alpha"]) for r in rows))
    return [max(1e-12, max(c)) for c in columns]


def _smoothness(alpha, highs: Sequence[float]):
    """The tie rule's order: the larger alpha (for K weights, the larger sum of ``alpha_r / high_r``)."""
    values = _values(alpha)
    if len(values) == 1:
        return values[0]
    return (sum(a / h for a, h in zip(values, highs)), values)
