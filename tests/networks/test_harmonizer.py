from __future__ import annotations

import pytest
import torch

from monai_cidir.networks import Harmonizer


def test_init_gives_identity_sine_parameters_for_every_alpha():
    torch.manual_seed(0)
    h = Harmonizer()
    alpha = torch.linspace(-1.0, 2.0, 11)[:, None]
    params = h(alpha)
    assert params.shape == (11, 4)
    expected = torch.tensor([1.0, 1.0, 0.0, 0.0]).expand(11, 4)
    assert torch.equal(params, expected)


def test_architecture_matches_the_paper():
    h = Harmonizer()
    linears = [m for m in h.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 128), (128, 64), (64, 32), (32, 4)]
    norms = [m.normalized_shape for m in h.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms == [(128,), (64,), (32,)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in h.modules()) == 3


def test_amplitude_and_frequency_stay_positive_and_c_d_are_raw():
    torch.manual_seed(1)
    h = Harmonizer(in_features=2, hidden_features=(8,))
    with torch.no_grad():
        h.head.weight.normal_(std=3.0)
        h.head.bias.normal_(std=3.0)
    alpha = torch.rand(50, 2)
    params = h(alpha)
    raw = h.head(h.hidden(alpha))
    assert (params[:, :2] > 0).all()
    torch.testing.assert_close(params[:, :2], raw[:, :2].exp())
    torch.testing.assert_close(params[:, 2:], raw[:, 2:])
    assert (raw[:, :2] < 0).any()  # exp really is what keeps them positive


def test_head_learns_from_the_first_step():
    torch.manual_seed(2)
    h = Harmonizer()
    h(torch.rand(4, 1)).sum().backward()
    assert h.head.weight.grad.abs().sum() > 0
    assert h.head.bias.grad.abs().sum() > 0


def test_one_dimensional_alpha_is_one_row():
    h = Harmonizer(in_features=3, hidden_features=(4,))
    assert h(torch.rand(3)).shape == (1, 4)


def test_errors():
    with pytest.raises(ValueError, match="out_features must be 4"):
        Harmonizer(out_features=3)
    with pytest.raises(ValueError, match="positive"):
        Harmonizer(hidden_features=(0,))
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        Harmonizer()(torch.rand(5, 2))
