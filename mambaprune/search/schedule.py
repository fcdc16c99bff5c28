"""schedule="auto": choose sites and keep rates for a FLOPs target from calibration batches.

The search measures, on the user's calibration batches, how far the pruned model's outputs move
from the dense model's (calibration.py: mean KL divergence of the softmax for (batch, classes)
outputs, else the mean squared error relative to the dense outputs' mean square). It builds a
schedule greedily: the FLOPs target is reached in ``steps`` equal increments, each taken at the
candidate site whose extra pruning moves the outputs least (per-block sensitivity, measured rather
than assumed). ToP's sites ("paper") and a site after every block ("uniform"), each with one solved
keep rate, are scored the same way. The better baseline is returned unless the greedy schedule
beats it by GREEDY_MARGIN (relative): a few calibration batches cannot tell close scores apart,
and the baselines do not depend on them (on the digits PlainMamba at -10% FLOPs, a greedy schedule
that scored best on 64 calibration images was twice as far from the dense model as ToP's sites on
500 test images). On the calibration data "auto" is therefore never worse than either baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx
from tqdm import tqdm

from ..analysis import GraphAnalysis
from ..errors import UnreachableRatioError
from ..planning import RATIO_TOLERANCE, Plan, make_plan, require_prunable, reruns_carried_chain, solve_site_keep
from ..settings import PruneSettings
from .calibration import Calibration

# The searched schedule must remove at least ratio - FINAL_SHORTFALL: pruning less than the
# baselines would make it look better for the wrong reason.
FINAL_SHORTFALL = 0.01
# The greedy schedule replaces the better baseline only if its calibration score is this much lower.
GREEDY_MARGIN = 0.2


@dataclass
class ScheduleSearch:
    """What the search measured: the discrepancy of every scored schedule, and the winner."""

    chosen: str
    scores: dict = field(default_factory=dict)   # name -> calibration discrepancy
    plans: dict = field(default_factory=dict)    # name -> Plan


def search_schedule(gm: fx.GraphModule, analysis: GraphAnalysis, flops: dict, settings: PruneSettings,
                    calibration: Calibration, steps: int = 3, max_sites: int = 6,
                    progress: bool = True) -> ScheduleSearch:
    """The best schedule for ``settings.ratio`` on the calibration batches (module docstring), for
    the alignment, metric and stage fill of ``settings``."""
    ratio, alignment = settings.ratio, settings.alignment
    require_prunable(analysis, "schedule 'auto'")

    def score(plan: Plan) -> float:
        return calibration.discrepancy(gm, analysis, plan, settings)

    search = ScheduleSearch(chosen="")
    sites = _spread(analysis.valid_sites, max_sites)
    bar = tqdm(total=steps * len(sites) + 2, desc=f"schedule='auto' ({alignment})", leave=False, disable=not progress)
    for name in ("paper", "uniform"):
        try:
            plan = make_plan(analysis, flops, ratio, name, reruns_carried_chain(settings))
        except UnreachableRatioError:
            bar.update(1)
            continue
        if plan.estimated_ratio < ratio - RATIO_TOLERANCE:
            bar.update(1)
            continue
        search.plans[name], search.scores[name] = plan, score(plan)
        bar.update(1)
    greedy = _greedy(analysis, flops, ratio, sites, steps, score, bar, reruns_carried_chain(settings))
    if greedy is not None:
        search.plans["greedy"], search.scores["greedy"] = greedy
    bar.close()
    if not search.scores:
        raise UnreachableRatioError(f"ratio {ratio} cannot be reached for this model by any schedule; use a smaller ratio")
    search.chosen = _choose(search.scores)
    return search


def _choose(scores: dict) -> str:
    """The better baseline, unless the greedy schedule is clearly (GREEDY_MARGIN) better."""
    baselines = {name: scores[name] for name in ("paper", "uniform") if name in scores}
    if not baselines:
        return "greedy"
    best = min(baselines, key=baselines.get)
    if "greedy" in scores and scores["greedy"] < (1 - GREEDY_MARGIN) * baselines[best]:
        return "greedy"
    return best


def _greedy(analysis, flops, ratio, sites, steps, score: Callable[[Plan], float], bar, carry: bool):
    """Reach ratio in ``steps`` increments, each at the site whose extra pruning scores best."""
    keeps: dict = {}
    best = None  # (plan, calibration discrepancy) after the latest step
    for step in range(1, steps + 1):
        target = ratio * step / steps
        options = []
        for site in sites:
            trial = solve_site_keep(analysis, flops, keeps, site, target, carry)
            shortfall = FINAL_SHORTFALL if step == steps else RATIO_TOLERANCE
            if target - shortfall <= trial.estimated_ratio <= target + RATIO_TOLERANCE:
                options.append((score(trial), site, trial))
            bar.update(1)
        if not options:
            return None
        loss, _, plan = min(options, key=lambda option: (option[0], option[1]))
        keeps, best = dict(plan.keeps), (plan, loss)
    return best


def _spread(sites: list, count: int) -> list:
    """At most ``count`` of ``sites``, evenly spread (first and last included)."""
    if len(sites) <= count:
        return list(sites)
    picks = {sites[round(i * (len(sites) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)
