"""schedule='auto' with calibration batches, and the 'paper' / 'uniform' named schedules."""
import os
import sys

import pytest
import torch

import mambaprune
from mambaprune.search import output_discrepancy
from mambaprune.search.schedule import _choose

sys.path.insert(0, os.path.dirname(__file__))
from calibration_inputs import mean_discrepancy, random_batches, tiny_vim  # noqa: E402


def test_auto_is_no_worse_than_paper_and_uniform_on_calibration_and_reaches_the_ratio():
    model = tiny_vim()
    calibration = random_batches()
    auto = mambaprune.compile_pruned(model, 0.3, schedule="auto", calibration=calibration)
    chosen, scores = auto.report.schedule_search
    assert set(scores) >= {"paper", "uniform"} and scores[chosen] <= min(scores["paper"], scores["uniform"])
    assert abs(auto.report.achieved_ratio - 0.3) <= 0.03
    measured = mean_discrepancy(model, auto, calibration)
    assert measured == pytest.approx(scores[chosen], rel=1e-4, abs=1e-7)
    for name in ("paper", "uniform"):
        other = mambaprune.compile_pruned(model, 0.3, schedule=name)
        theirs = mean_discrepancy(model, other, calibration)
        assert measured <= theirs + 1e-9
    assert "schedule='auto' chose" in str(auto.report)


def test_uniform_schedule_prunes_after_every_block_and_paper_is_the_default():
    model = tiny_vim()
    uniform = mambaprune.compile_pruned(model, 0.3, schedule="uniform")
    assert sorted(uniform.report.sites) == list(range(1, 6))
    paper = mambaprune.compile_pruned(model, 0.3, schedule="paper")
    default = mambaprune.compile_pruned(model, 0.3)
    assert paper.report.sites == default.report.sites


@pytest.mark.parametrize("scores,chosen", [
    ({"paper": 1.0, "uniform": 0.9, "greedy": 0.8}, "uniform"),   # greedy within the margin: noise
    ({"paper": 1.0, "uniform": 0.9, "greedy": 0.7}, "greedy"),    # clearly better
    ({"paper": 0.5, "greedy": 0.45}, "paper"),
    ({"greedy": 3.0}, "greedy"),                                   # no baseline reaches the ratio
])
def test_the_greedy_schedule_must_clearly_beat_the_better_baseline(scores, chosen):
    assert _choose(scores) == chosen


def test_output_discrepancy_is_kl_for_logits_and_relative_mse_otherwise():
    logits = torch.randn(4, 10)
    assert output_discrepancy([logits], [logits]) == pytest.approx(0.0, abs=1e-7)
    assert output_discrepancy([logits], [logits.flip(-1)]) > 0
    features = torch.randn(4, 3, 5)
    assert output_discrepancy([features], [2 * features]) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule="auto"), "schedule='auto' / alignment='auto' and calibration= go together"),
    (dict(calibration=[torch.randn(2, 3, 32, 32)]), "schedule='auto' / alignment='auto' and calibration= go together"),
    (dict(schedule="auto", calibration=[]), "calibration is empty"),
    (dict(schedule="auto", calibration=[(torch.randn(2, 3, 32, 32), torch.zeros(2))]),
     "calibration batch 0 does not match"),
    (dict(schedule="bottom"), "schedule must be None, one of"),
])
def test_auto_schedule_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mambaprune.compile_pruned(tiny_vim(), 0.3, **kwargs)
