"""The option groups: one owner of each name, default and data-free check."""

from __future__ import annotations

import functools
import inspect

import pytest

from monai_cidir.engines import CIDIRTrainer, RegistrationOptions, SelectionSettings, TrainingSettings, register_patient, run_cohort
from monai_cidir.engines.registration import COMPONENTS, RESULT_SETTINGS


class _Unloadable:
    """Two pairs that record any attempt to load them."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        self.calls.append(i)
        raise AssertionError("loaded")


def test_registration_options_are_the_two_groups_plus_their_own():
    names = set(RegistrationOptions.names())
    assert set(TrainingSettings.names()) <= names and set(SelectionSettings.names()) <= names
    # every option that defines a result is either an option or a component
    assert set(RESULT_SETTINGS) - {"alpha_prior"} <= names | set(COMPONENTS)
    # the groups' defaults are the register_patient defaults
    d = RegistrationOptions.defaults()
    assert (d["max_iterations"], d["num_points"], d["regularization_points"], d["num_alphas"]) == (1000, 10000, 2000, 21)
    # the functions that take them keep ~10 parameters
    for fn in (register_patient, CIDIRTrainer.__init__):
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD and p.name != "self"]
        assert len(params) <= 11, (fn, len(params))


@pytest.mark.parametrize(
    "given, error",
    [
        ({"max_iterations": 0}, "expected max_iterations >= 1 and num_points >= 2, found 0, 10000"),
        ({"num_points": 1}, "expected max_iterations >= 1 and num_points >= 2, found 1000, 1"),
        ({"regularization_points": 1}, r"regularization_points must be >= 2 or None \(every point\), found 1"),
        ({"max_epochs": 0}, "max_epochs must be >= 1 or None, found 0"),
        ({"iterations_per_epoch": 0}, "iterations_per_epoch must be >= 1, found 0"),
        ({"derivatives": "numeric"}, "derivatives must be 'forward' or 'autograd', found 'numeric'"),
        ({"smoothing_mm": (2.0, 0.0)}, r"smoothing_mm must hold positive sigmas \(mm\), found \(2.0, 0.0\)"),
        ({"time_budget_s": -1}, "time_budget_s must be a positive number of seconds or None, found -1"),
    ],
)
def test_training_settings_refuse_bad_values(given, error):
    with pytest.raises(ValueError, match=error):
        TrainingSettings(**given)
    with pytest.raises(ValueError, match=error):  # the same check, from register_patient's options
        RegistrationOptions.from_keywords(given)


def test_training_settings_epochs():
    s = TrainingSettings(max_iterations=50, iterations_per_epoch=4, max_epochs=2)
    assert (s.epoch_length, s.total_iterations) == (4, 8)
    s = TrainingSettings(max_iterations=3, iterations_per_epoch=100)
    assert (s.epoch_length, s.total_iterations) == (3, 3)
    assert TrainingSettings(time_budget_s="90").time_budget_s == 90.0


def test_misspelt_options_name_the_closest(tmp_path):
    with pytest.raises(TypeError, match=r"CIDIRTrainer\(\) got unexpected keyword argument\(s\) \['num_point'\] \('num_point': did you mean 'num_points'\?\)"):
        TrainingSettings.from_keywords({"num_point": 5})
    with pytest.raises(TypeError, match=r"\['handler'\] \('handler': did you mean 'handlers'\?\)"):
        RegistrationOptions.from_keywords({"handler": []}, extra=COMPONENTS)
    with pytest.raises(ValueError, match="selection_mode must be 'warp_mask' or 'segment', found 'dice'"):
        SelectionSettings(selection_mode="dice")
    # a cohort refuses a misspelt option once, before loading or training any pair
    calls = []
    Pairs = functools.partial(_Unloadable, calls)
    with pytest.raises(TypeError, match="did you mean 'max_iterations'"):
        run_cohort(Pairs(), tmp_path, max_iteration=5)
    assert calls == [] and not any(tmp_path.iterdir())


def test_command_line_strings_reach_the_key_metric_inside_the_evaluator_partial():
    from monai_cidir.engines import AlphaSelectionEvaluator
    from monai_cidir.engines.workflow import _normalised_factory
    from monai_cidir.handlers import AlphaChoice

    factory = functools.partial(AlphaSelectionEvaluator, key_metric=functools.partial(AlphaChoice, no_folding="true"), chunk_size=7)
    normalised = _normalised_factory(factory)
    assert normalised.keywords["key_metric"]().no_folding is True and normalised.keywords["chunk_size"] == 7
    assert _normalised_factory(functools.partial(AlphaChoice, no_folding="false"))().no_folding is False


def test_a_trainer_partial_with_a_bad_setting_stops_the_cohort_before_any_pair(tmp_path):
    calls = []
    Pairs = functools.partial(_Unloadable, calls)
    for keywords, error, match in (
        ({"num_point": 10}, TypeError, "did you mean 'num_points'"),
        ({"max_iterations": 0}, ValueError, "expected max_iterations >= 1"),
    ):
        with pytest.raises(error, match=match):
            run_cohort(Pairs(), tmp_path, trainer=functools.partial(CIDIRTrainer, **keywords))
    assert calls == [] and not any(tmp_path.iterdir())


def test_null_as_typed_on_a_command_line_reaches_the_trainer_as_none():
    """`--regularization_points null` (documented: regularise every point) and `--time_budget_s none`."""
    from monai_cidir.engines.workflow import _normalised_factory

    trainer = _normalised_factory(functools.partial(CIDIRTrainer, regularization_points="null", time_budget_s="none", max_iterations=5))
    assert trainer.keywords == {"regularization_points": None, "time_budget_s": None, "max_iterations": 5}
    settings = TrainingSettings.from_keywords({k: v for k, v in trainer.keywords.items()})
    assert settings.regularization_points is None and settings.time_budget_s is None
