"""CIDIRTrainer: the loss it minimises, Ignite behaviour, determinism, checkpoint resume, autograd mode."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_fixtures import breathing_motion, make_blob_pair
from ignite.engine import Events

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines import AlphaPrior, CIDIRTrainer, RegistrationModel, make_point_sampler
from monai_cidir.losses import BendingEnergyRegularizer, GlobalNCCLoss, JacobianRegularizer
from monai_cidir.handlers import TrainingCheckpoint
from monai_cidir.networks import ConditionedINR


@pytest.fixture(scope="module")
def pair():
    return make_blob_pair(shape=(24, 22, 18), spacing=(6.0, 6.0, 7.5), motion=breathing_motion(), num_blobs=30)


def _trainer(pair, seed=0, **kw):
    torch.manual_seed(seed)
    net = ConditionedINR(hidden_features=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sampler = kw.pop("sampler", None) or make_point_sampler(pair["fixed_mask"], seed=seed)
    kw.setdefault("num_points", 256)
    return CIDIRTrainer(net, opt, pair["fixed_image"], pair["moving_image"], sampler, seed=seed, **kw)


def test_loss_is_minus_ncc_plus_alpha_times_scaled_regularizers(pair):
    points = make_point_sampler(pair["fixed_mask"], seed=3)(200)
    trainer = _trainer(
        pair, max_iterations=1, sampler=lambda n: points, loss={"bending": 1.0, "jacobian": 0.5},
        alpha_prior=AlphaPrior(0.2, 0.8, per_point=False),
    )
    before = copy.deepcopy(trainer.network)
    trainer.run()
    out = trainer.state.output
    alpha = out["alpha"]
    assert 0.2 <= alpha <= 0.8
    model = RegistrationModel(before, CoordinateMapping.from_image(pair["fixed_image"]))
    moved, jac, hess = model.forward_with_derivatives(points, alpha, order=2)
    fmap, mmap = CoordinateMapping.from_image(pair["fixed_image"]), CoordinateMapping.from_image(pair["moving_image"])
    sim = GlobalNCCLoss()(fmap.sample(pair["fixed_image"], points), mmap.sample(pair["moving_image"], moved))
    bend = alpha * 3e3 * BendingEnergyRegularizer()(hess)  # the documented default scales: bending 3e3, Jacobian 5
    jreg = alpha * 0.5 * 5.0 * JacobianRegularizer()(jac)
    assert out["similarity"] == pytest.approx(float(sim), rel=1e-4)
    assert out["reg_bending"] == pytest.approx(float(bend), rel=1e-3, abs=1e-9)
    assert out["reg_jacobian"] == pytest.approx(float(jreg), rel=1e-3, abs=1e-9)
    assert out["loss"] == pytest.approx(out["similarity"] + out["regularization"], rel=1e-6)


def test_ignite_events_handlers_and_exact_iteration_count(pair):
    from monai.handlers import StatsHandler

    trainer = _trainer(pair, max_iterations=7, iterations_per_epoch=3)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["loss"]))
    StatsHandler(name="cidir_test", output_transform=lambda x: x["loss"], iteration_log=True).attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 7 and len(seen) == 7
    assert {"loss", "similarity", "regularization", "reg_bending", "alpha", "lr"} <= set(trainer.state.output)
    # cosine schedule: the rate decreases from the initial one
    assert trainer.state.output["lr"] < 1e-4


def test_deterministic_and_resume_from_checkpoint(pair, tmp_path):
    full = _trainer(pair, max_iterations=6)
    full.run()
    again = _trainer(pair, max_iterations=6)
    again.run()
    for a, b in zip(full.network.parameters(), again.network.parameters()):
        assert torch.equal(a, b)
    ckpt = tmp_path / "checkpoint.pt"
    interrupted = _trainer(pair, max_iterations=6)
    TrainingCheckpoint(ckpt, interval=3).attach(interrupted)
    interrupted.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())
    interrupted.run()
    assert interrupted.state.iteration == 3
    resumed = _trainer(pair, seed=0, max_iterations=6)
    TrainingCheckpoint(ckpt).attach(resumed)
    assert resumed.resume() and resumed.state.iteration == 3
    resumed.run()
    assert resumed.state.iteration == 6
    for a, b in zip(full.network.parameters(), resumed.network.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_autograd_derivatives_mode_gives_the_same_loss(pair):
    outs = []
    for mode in ("forward", "autograd"):
        trainer = _trainer(pair, max_iterations=2, derivatives=mode, alpha_prior=AlphaPrior(per_point=True))
        trainer.run()
        outs.append(trainer.state.output)
    assert outs[0]["loss"] == pytest.approx(outs[1]["loss"], rel=1e-4)
    assert outs[0]["reg_bending"] == pytest.approx(outs[1]["reg_bending"], rel=1e-3)


def test_alpha_prior():
    g = torch.Generator().manual_seed(0)
    a = AlphaPrior(0.0, 1.0, per_point=True).sample(20000, g)
    assert a.shape == (20000, 1) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert float(a.mean()) == pytest.approx(0.5, abs=0.01)
    b = AlphaPrior(0.0, 1.0, "log-uniform").sample(1, g)
    assert b.shape == (1,)
    logs = torch.log10(AlphaPrior(0.0, 1.0, "log-uniform", per_point=True, log_floor=1e-3).sample(20000, g))
    assert float(logs.mean()) == pytest.approx(-1.5, abs=0.03)  # uniform in log10 on [-3, 0]
    with pytest.raises(ValueError, match="low <= high"):
        AlphaPrior(1.0, 0.5)
    # low == high: IDIR's single alpha
    fixed = AlphaPrior(0.5, 0.5, per_point=True).sample(100, g)
    assert torch.equal(fixed, torch.full((100, 1), 0.5))
    assert torch.equal(AlphaPrior(0.5, 0.5, "log-uniform").sample(1, g), torch.tensor([0.5]))


def test_time_budget_stops_training_and_anneals_the_schedule(pair, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    trainer = _trainer(pair, max_iterations=100000, time_budget_s=1.5)
    TrainingCheckpoint(ckpt).attach(trainer)
    trainer.run()
    assert trainer.stopped_by_time_budget and 1 < trainer.state.iteration < 100000
    assert 1.5 <= trainer.training_seconds < 3.0
    # the cosine schedule followed the time: the last step ran at ~the final rate (0.05 x 1e-4)
    assert trainer.state.output["lr"] < 0.1e-4
    assert trainer.progress() == 1.0
    # the spent time is stored with the checkpoint: a resumed trainer knows the budget is used up
    resumed = _trainer(pair, max_iterations=100000, time_budget_s=1.5)
    assert TrainingCheckpoint(ckpt).resume(resumed) and resumed.finished and resumed.training_seconds >= 1.5
    resumed.run()
    assert resumed.state.iteration == trainer.state.iteration
    # iterations still end a run under a generous budget, and the schedule then follows iterations
    short = _trainer(pair, max_iterations=5, time_budget_s=600)
    short.run()
    assert short.state.iteration == 5 and not short.stopped_by_time_budget
    for bad in (0, -3, "abc", float("inf")):
        with pytest.raises(ValueError, match="time_budget_s"):
            _trainer(pair, max_iterations=5, time_budget_s=bad)


class _NaNAfter(torch.nn.Module):
    """A field that turns NaN after ``n`` forward calls (what a diverging run looks like)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net = ConditionedINR(hidden_features=16)
        self.calls, self.n = 0, n

    def forward(self, coords, alpha=None):
        self.calls += 1
        out = self.net(coords, alpha)
        return out * float("nan") if self.calls > self.n else out


def test_a_non_finite_loss_stops_training_with_a_clear_error(pair):
    torch.manual_seed(0)
    net = _NaNAfter(3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    trainer = CIDIRTrainer(
        net, opt, pair["fixed_image"], pair["moving_image"], make_point_sampler(pair["fixed_mask"], seed=0),
        num_points=64, max_iterations=20, derivatives="autograd",
    )
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at iteration 4: .*NaN/inf voxels"):
        trainer.run()
    assert trainer.state.iteration == 4  # stopped at once, not after 20 iterations of NaN


@pytest.mark.parametrize("signum, raised", [("SIGTERM", SystemExit), ("SIGINT", KeyboardInterrupt)])
def test_a_signal_writes_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(pair, tmp_path, signum, raised):
    """SIGTERM/SIGINT mid-training: the iteration finishes, checkpoint.pt is written, the process stops; resuming gives the same network."""
    import os
    import signal

    full = _trainer(pair, max_iterations=8)
    full.run()
    ckpt = tmp_path / "checkpoint.pt"
    killed = _trainer(pair, max_iterations=8)
    TrainingCheckpoint(ckpt, interval=1000, every_s=None).attach(killed)
    killed.add_event_handler(Events.ITERATION_COMPLETED(once=5), lambda e: os.kill(os.getpid(), getattr(signal, signum)))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(raised) as e:
        killed.run()
    if raised is SystemExit:
        assert e.value.code == 143  # 128 + SIGTERM, as a shell reports a terminated process
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    # the signal came after iteration 5's checkpoint handler: the next iteration finishes, then it stops
    assert killed.state.iteration == 6 and torch.load(ckpt, weights_only=False)["engine"]["iteration"] == 6
    resumed = _trainer(pair, max_iterations=8)
    TrainingCheckpoint(ckpt).attach(resumed)
    assert resumed.resume() and resumed.state.iteration == 6
    resumed.run()
    for a, b in zip(full.network.parameters(), resumed.network.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoints_follow_the_clock_as_well_as_the_iterations(pair, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    trainer = _trainer(pair, max_iterations=6)
    TrainingCheckpoint(ckpt, interval=1000, every_s=0.0).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: e.terminate())  # a crash would lose nothing done
    trainer.run()
    assert torch.load(ckpt, weights_only=False)["engine"]["iteration"] == 4
    ckpt.unlink()
    slow = _trainer(pair, max_iterations=6)
    TrainingCheckpoint(ckpt, interval=1000, every_s=3600.0).attach(slow)
    slow.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        slow.run()
    assert not ckpt.exists()  # neither 1000 iterations nor an hour had passed
    with pytest.raises(ValueError, match="every_s"):
        TrainingCheckpoint(ckpt, every_s=-1.0)


def test_coarse_to_fine_smoothing_trains_on_smoothed_images_first(pair):
    """smoothing_mm=(6,): NCC of the 6 mm-smoothed images for the first half of the run, of the images as they are after."""
    from monai.transforms import GaussianSmooth

    points = make_point_sampler(pair["fixed_mask"], seed=3)(200)
    fmap, mmap = CoordinateMapping.from_image(pair["fixed_image"]), CoordinateMapping.from_image(pair["moving_image"])
    losses = []
    for smoothing in ((6.0,), None):
        trainer = _trainer(pair, max_iterations=4, sampler=lambda n: points, smoothing_mm=smoothing, alpha_prior=AlphaPrior(0.0, 0.0))
        before = copy.deepcopy(trainer.network)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: losses.append(e.state.output["similarity"]))
        trainer.run()
    model = RegistrationModel(before, fmap)  # both runs start from the same weights (seed 0)
    moved = model(points, 0.0)
    smooth = lambda img, m: GaussianSmooth(sigma=[6.0 / float(s) for s in m.spacing])(img.as_tensor())  # noqa: E731
    expect = GlobalNCCLoss()(fmap.sample(smooth(pair["fixed_image"], fmap), points), mmap.sample(smooth(pair["moving_image"], mmap), moved))
    raw = GlobalNCCLoss()(fmap.sample(pair["fixed_image"], points), mmap.sample(pair["moving_image"], moved))
    assert losses[0] == pytest.approx(float(expect), rel=1e-4)  # iteration 1 (progress 0) on the smoothed pair
    assert losses[1] == pytest.approx(float(raw), rel=1e-4)
    assert abs(float(expect) - float(raw)) > 1e-3  # the two really differ
    with pytest.raises(ValueError, match="smoothing_mm"):
        _trainer(pair, smoothing_mm=(0.0,))


def test_max_epochs_caps_the_run_and_the_schedule_steps_once_per_iteration(pair):
    """MONAI's ``max_epochs`` (the bundle's train#trainer#max_epochs) caps the iterations; the
    learning rate follows the cosine schedule of the capped run, stepped by LrScheduleHandler."""
    import math

    trainer = _trainer(pair, max_iterations=50, iterations_per_epoch=4, max_epochs=2)
    rates = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rates.append(e.state.output["lr"]))
    trainer.run()
    assert trainer.state.iteration == 8 and trainer.max_iterations == 8 and trainer.state.max_epochs == 2
    expect = [1e-4 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / 8))) for i in range(8)]
    assert rates == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        _trainer(pair, max_iterations=5, max_epochs=0)


def test_the_training_forward_goes_through_the_inferer(pair):
    from monai.inferers import SimpleInferer

    class Counting(SimpleInferer):
        calls = 0

        def __call__(self, inputs, network, *args, **kwargs):
            Counting.calls += 1
            return super().__call__(inputs, network, *args, **kwargs)

    trainer = _trainer(pair, max_iterations=3, regularization_points=100, inferer=Counting())
    trainer.run()
    assert Counting.calls == 6  # per step: the regularised points with derivatives, the rest plainly


def test_a_regularizer_subset_below_two_points_is_refused_before_training(pair):
    with pytest.raises(ValueError, match=r"regularization_points must be >= 2 or None \(every point\), found 1"):
        _trainer(pair, regularization_points=1)
