"""alignment="auto": choose the hidden-state alignment from calibration batches.

Which alignment keeps a pruned model closest to the dense one depends on the model, and by a wide
margin (benchmarks/fidelity.py on the digits checkpoints, 500 test images): on the ViM, "none"
keeps 0.928 top-1 at -30% FLOPs against hold's 0.780, while on PlainMamba "none" falls to 0.782
already at -10%, where hold keeps 0.970. So the candidates (AUTO_ALIGNMENT_CANDIDATES) are each
scored the way schedule="auto" scores schedules: the mean output discrepancy from the dense model
on the calibration batches, for the plan of the requested schedule (with schedule="auto", the
schedule searched for that alignment). The lowest wins; ties go to the earlier candidate. The
ViT-style "none-unsorted" is never a candidate: it breaks the scan order (DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..analysis import GraphAnalysis
from ..planning import Plan, make_plan, reruns_carried_chain
from ..settings import Alignment, PruneSettings
from .calibration import Calibration
from .schedule import ScheduleSearch, search_schedule

AUTO_ALIGNMENT_CANDIDATES = (Alignment.HOLD, Alignment.NONE, Alignment.DECAY)


@dataclass
class AlignmentSearch:
    """The calibration discrepancy of each candidate alignment, its plan, and the winner."""

    chosen: str
    scores: dict = field(default_factory=dict)             # alignment -> calibration discrepancy
    plans: dict = field(default_factory=dict)              # alignment -> Plan
    schedule_searches: dict = field(default_factory=dict)  # alignment -> ScheduleSearch (schedule="auto")

    @property
    def plan(self) -> Plan:
        return self.plans[self.chosen]

    @property
    def schedule_search(self) -> ScheduleSearch | None:
        return self.schedule_searches.get(self.chosen)


def search_alignment(gm: fx.GraphModule, analysis: GraphAnalysis, flops: dict, settings: PruneSettings,
                     calibration: Calibration, progress: bool = True) -> AlignmentSearch:
    """Score every candidate alignment on ``calibration`` for ``settings``' schedule and ratio; the
    best wins."""
    search = AlignmentSearch(chosen="")
    fixed_plan = None if settings.schedule == "auto" else make_plan(
        analysis, flops, settings.ratio, settings.schedule, reruns_carried_chain(settings))
    for alignment in AUTO_ALIGNMENT_CANDIDATES:
        candidate = settings.with_(alignment=alignment)
        if fixed_plan is not None:
            plan, score = fixed_plan, calibration.discrepancy(gm, analysis, fixed_plan, candidate)
        else:
            found = search_schedule(gm, analysis, flops, candidate, calibration, progress=progress)
            search.schedule_searches[alignment] = found
            plan, score = found.plans[found.chosen], found.scores[found.chosen]
        search.plans[alignment], search.scores[alignment] = plan, score
    search.chosen = min(AUTO_ALIGNMENT_CANDIDATES, key=lambda name: search.scores[name])
    return search
