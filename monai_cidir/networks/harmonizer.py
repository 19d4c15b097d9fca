"""The harmonizer: a small MLP that maps the regularisation weight alpha to the activation parameters.

In cIDIR the main network's activation is ``sigma(z) = a * sin(b * omega_0 * z + c) + d``; the
harmonizer predicts the four numbers ``(a, b, c, d)`` from alpha, shared by every hidden layer (the
paper), or one set of four per layer or per neuron (``out_features = 4 * groups``; see
:class:`~monai_cidir.networks.ConditionedINR`'s ``modulation``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Harmonizer"]


class Harmonizer(nn.Module):
    """MLP ``alpha -> (a, b, c, d)``; each hidden layer is Linear -> LayerNorm -> SiLU.

    With ``out_features = 4 * G`` it predicts ``G`` sets at once, laid out as four blocks of ``G``
    columns: ``[a_1..a_G, b_1..b_G, c_1..c_G, d_1..d_G]`` (``G = 1``: the paper's four numbers).
    The last layer predicts raw values ``(ra, rb, rc, rd)`` that are mapped to
    ``a = exp(ra)``, ``b = exp(rb)``, ``c = rc``, ``d = rd`` so that the amplitude ``a`` and the
    frequency factor ``b`` stay positive (as in INCODE). The last layer's weight and bias are
    initialised to zero, so at initialisation ``a = b = 1`` and ``c = d = 0`` for every alpha:
    the conditioned network then is exactly a SIREN. The last layer still receives gradients at
    the first step (its input, the last hidden activation, is non-zero), after which the
    dependence on alpha is learned.

    Args:
        in_features: number of conditioning inputs (1 for a single alpha).
        hidden_features: widths of the hidden layers; the paper uses (128, 64, 32).
        out_features: number of activation parameters: 4 (a, b, c, d), or ``4 * G`` for ``G`` sets.

    Raises:
        ValueError: if ``out_features`` is not a positive multiple of 4 or a width is not positive.

    Example::

        >>> h = Harmonizer()
        >>> h(torch.tensor([[0.3], [0.9]]))  # one row per alpha: a, b, c, d
        tensor([[1., 1., 0., 0.],
                [1., 1., 0., 0.]], grad_fn=<CatBackward0>)
    """

    def __init__(
        self, in_features: int = 1, hidden_features: Sequence[int] = (128, 64, 32), out_features: int = 4
    ) -> None:
        super().__init__()
        if out_features < 4 or out_features % 4:
            raise ValueError(
                f"the harmonizer predicts (a, b, c, d) sets: out_features must be 4 or a multiple of 4, found {out_features}"
            )
        self.groups = out_features // 4
        widths = [int(in_features), *(int(w) for w in hidden_features)]
        if min(widths) < 1:
            raise ValueError(f"in_features and hidden_features must be positive, found {widths}")
        self.in_features = widths[0]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.LayerNorm(fan_out), nn.SiLU()]
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], out_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        """Predict the activation parameters.

        Args:
            alpha: tensor of shape (B, in_features) (or (in_features,) for one alpha).

        Returns:
            tensor (B, 4 * G) whose column blocks are a, b, c, d (a > 0, b > 0); (B, 4) for G = 1.

        Raises:
            ValueError: if the last dimension of ``alpha`` is not ``in_features``.
        """
        if alpha.ndim == 1:
            alpha = alpha[None]
        if alpha.ndim != 2 or alpha.shape[1] != self.in_features:
            raise ValueError(
                f"Harmonizer expects alpha of shape (B, {self.in_features}), found {tuple(alpha.shape)}"
            )
        raw = self.head(self.hidden(alpha))
        g = raw.shape[1] // 4
        return torch.cat([torch.exp(raw[:, : 2 * g]), raw[:, 2 * g :]], dim=1)
