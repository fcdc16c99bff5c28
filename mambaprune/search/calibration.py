"""Calibration: the user's batches, the dense model's outputs on them, and how far a pruned
model's outputs move from those (what schedule="auto" and alignment="auto" minimise)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..analysis import GraphAnalysis
from ..capture import flat_inputs, run_graph
from ..pass_infra import run_passes
from ..planning import Plan
from ..rewrite import PruneTokens, SiteSpec
from ..runtime.process_group import rank_and_world, sum_over_ranks
from ..settings import PruneSettings


def output_discrepancy(dense: List[torch.Tensor], pruned: List[torch.Tensor]) -> float:
    """KL(dense || pruned) of softmax outputs for (batch, classes) tensors, else relative MSE."""
    total = 0.0
    for d, p in zip(dense, pruned):
        d, p = d.float(), p.float()
        if d.dim() == 2 and d.shape[1] > 1:
            total += F.kl_div(p.log_softmax(-1), d.log_softmax(-1), log_target=True, reduction="batchmean").item()
        else:
            total += ((d - p).square().mean() / d.square().mean().clamp_min(1e-12)).item()
    return total


def plan_sites(plan: Plan) -> list:
    """The SiteSpecs of a plan, in site order."""
    return [SiteSpec(key, k) for key, k in sorted(plan.kept.items())]


@dataclass
class Calibration:
    """This process's calibration batches (flat graph inputs), the dense model's outputs on them, and
    how many batches all processes hold together.

    Under torch.distributed (every rank passing the same calibration, as with `recover`'s data) rank r
    of w evaluates batches r, r + w, ... and the discrepancies are summed over the ranks: the searches
    cost 1/w as much per process and every rank reaches the same choice, the one a single process
    reaches (up to the order of the float additions)."""

    batches: List[list]
    dense: List[list]
    total: int

    @classmethod
    def of(cls, gm: fx.GraphModule, batches: List[list]) -> "Calibration":
        rank, world = rank_and_world()
        mine = batches[rank::world]
        with torch.no_grad():
            return cls(mine, [run_graph(gm, flat) for flat in mine], len(batches))

    def discrepancy(self, gm: fx.GraphModule, analysis: GraphAnalysis, plan: Plan, settings: PruneSettings) -> float:
        """Mean ``output_discrepancy`` of ``plan`` rewritten with ``settings`` over all the batches."""
        pruned = run_passes([PruneTokens(analysis, plan_sites(plan), settings)], gm).graph_module
        with torch.no_grad():
            local = sum(output_discrepancy(d, run_graph(pruned, flat)) for d, flat in zip(self.dense, self.batches))
        return sum_over_ranks([local])[0] / self.total


def calibration_inputs(calibration: Iterable, expected: int) -> List[list]:
    """Flat graph inputs of every calibration batch (a tensor or a tuple of the model's positional
    inputs); ValueError when there is none or one does not fit the model's ``expected`` inputs."""
    batches = []
    for index, batch in enumerate(calibration):
        inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        flat = flat_inputs(inputs)
        if len(flat) != expected or not all(isinstance(t, torch.Tensor) for t in flat):
            raise InvalidArgumentError(
                f"calibration batch {index} does not match the model's inputs: expected {expected} tensor(s) "
                f"(what you would pass as model(*batch)), got {len(flat)} value(s). For a loader of "
                "(images, labels) pairs pass `(images for images, _ in loader)`.")
        batches.append(flat)
    if not batches:
        raise InvalidArgumentError("calibration is empty: schedule='auto' needs at least one batch of model inputs")
    return batches
