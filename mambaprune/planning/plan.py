"""Plan: ratio (or schedule) -> pruning sites and a static kept-token count K per site.

The FLOPs model is the dense graph's own per-node FLOPs (torch.utils.flop_counter, our op formulas,
MACs as DESIGN.md says) with every token-carrying node downstream of a site scaled by K/L: exact for
token-wise layers (a per-token op on a pruned grid included), the scan and the token conv1d (the SSD
scan's chunked count is rescaled by its own formula); a
conv2d that looks at neighbours runs densely on the scattered grid and is not scaled, nor is anything
after the downsampling that ends a pruned stage (the grid is restored there), nor, with fill="carry",
the per-token ops between the stage's stream and what the downsampling reads (re-run on the carried
stream: `GraphAnalysis.carried_chain`). Default sites
are evenly spaced like ToP's (after blocks 5, 10, 15 of 24); one keep rate for all sites is solved
so that the reduction is closest to `ratio`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from ..analysis import GraphAnalysis, Grid, fact_of, is_token_fact
from ..analysis.ops import SSD_SCAN, argument, is_scan, looks_at_neighbours, op_name, scan_signature, shape_of
from ..runtime import ssd_scan_macs
from ..errors import InvalidArgumentError, UnreachableRatioError, UnsupportedModelError
from ..settings import Fill

TOP_FRACTIONS = (5 / 24, 10 / 24, 15 / 24)
TOP_KEEP = 0.8
# A solved plan (a ratio with "paper", "uniform" or "auto") never keeps fewer than this fraction of a
# stage's tokens at any site: reaching a target by keeping 2 of 64 tokens (or 1 of 196) leaves a model
# that says nothing about the image. The ratio is reported unreachable instead. An explicit schedule
# {k: keep_rate} sets what it sets.
MIN_KEPT_FRACTION = 1 / 8
# A solved plan may fall short of `ratio` by this much (the kept counts are whole tokens); more is refused
# as unreachable. The schedule search uses the same tolerance.
RATIO_TOLERANCE = 0.03


@dataclass
class Plan:
    keeps: dict              # site key -> keep rate
    kept: dict               # site key -> K
    tokens_per_block: list
    dense_flops: float
    estimated_flops: float

    @property
    def estimated_ratio(self) -> float:
        return 1 - self.estimated_flops / self.dense_flops if self.dense_flops else 0.0


def reruns_carried_chain(settings) -> bool:
    """Whether a stage end is restored by re-running its per-token chain on the carried stream
    (rewrite/stage_end.py): fill="carry" without merging (a merge restores by unmerging the kept tokens)."""
    return settings.fill is Fill.CARRY and not settings.reduction.merges


def estimate(analysis: GraphAnalysis, flops: dict, kept: dict, carry: bool = True) -> float:
    """Estimated MACs when site k keeps kept[k] tokens: each node downstream of a site scaled by K/L when
    its cost scales with the tokens, except what runs on restored tokens (after the downsampling that ends
    its stage, a neck or decoder reading a restored feature map, and with `carry` (reruns_carried_chain)
    the chain re-run on a stage's carried stream: counted dense)."""
    keys = sorted(kept)
    rerun = carried_chains(analysis, keys) if carry else frozenset()
    total = 0.0
    for node, f in flops.items():
        if not f:
            continue
        region = analysis.region(node, keys)
        key = keys[region - 1] if region else None
        if key and not analysis.runs_dense(node, key) and node not in rerun and scales_with_tokens(node):
            f *= token_scaling(node, kept[key], analysis.site_length(key))
        total += f
    return total


def carried_chains(analysis: GraphAnalysis, keys: list) -> frozenset:
    """The nodes re-run densely on the carried stream at the end of every stage the sites `keys` prune."""
    stages: dict = {}
    for key in keys:
        if analysis.stage_end(key) is not None:
            stages.setdefault(analysis.stage_end(key).downsampling, []).append(key)
    return frozenset().union(*(analysis.carried_chain(tuple(stage)) for stage in stages.values()))


def token_scaling(node: fx.Node, kept: int, length: int) -> float:
    """The factor a node's MACs change by when it runs on `kept` of its `length` tokens: K/L, but for the
    SSD scan, whose chunked algorithm is quadratic in the tokens of a chunk (runtime.ssd_scan_macs)."""
    if not (is_scan(node) and scan_signature(node) is SSD_SCAN):
        return kept / length
    x, b = (shape_of(argument(node, name)) for name in ("x", "B"))
    has = {name: argument(node, name) is not None for name in ("D", "z")}
    at = lambda tokens: ssd_scan_macs((1, tokens, *x[2:]), (1, tokens, *b[2:]), has["D"], has["z"])  # noqa: E731
    return at(kept) / at(length)


def scales_with_tokens(node: fx.Node) -> bool:
    """A token-carrying node's cost is per token, except a conv2d that looks at neighbours: on a
    pruned grid it runs densely on the scattered cells (rewrite/rules/conv2d.py)."""
    fact = fact_of(node)
    if isinstance(fact, Grid) and op_name(node) == "aten::conv2d":
        return not looks_at_neighbours(node)
    return is_token_fact(fact)


def kept_counts(analysis: GraphAnalysis, keeps: dict) -> dict:
    """K at every site: protected tokens plus the keep rate of the free ones (at least one)."""
    kept, previous = {}, None
    for key in sorted(keeps):
        length = analysis.site_length(key)
        current = kept[previous] if previous is not None and analysis.same_stage(previous, key) else length
        protected = analysis.protected_below(length)
        free = current - protected
        k = protected + max(1, min(free, int(round(keeps[key] * free))))
        kept[key] = k
        previous = key
    return kept


def tokens_per_block(analysis: GraphAnalysis, kept: dict) -> list:
    tokens, current = [], None
    for index, block in enumerate(analysis.blocks):
        # a site before a stage end (MambaVision's attention blocks) prunes that stage only
        site_here = index in kept and analysis.site_length(index) == block.token_length
        if current is None or (not site_here and block.token_length != analysis.blocks[index - 1].token_length):
            current = block.token_length
        current = kept[index] if site_here else current
        tokens.append(current)
    return tokens


def top_sites(depth: int) -> list:
    """ToP's ViM-S sites (after blocks 5, 10, 15 of 24), scaled to `depth` blocks."""
    return sorted({max(1, min(depth - 1, round(f * depth))) for f in TOP_FRACTIONS})


def default_sites(analysis: GraphAnalysis) -> list:
    """ToP's sites (after blocks 5, 10, 15 of 24) scaled to the depth, snapped to possible sites."""
    wanted = top_sites(analysis.depth)
    valid = analysis.valid_sites
    if not valid:
        return []
    snapped = sorted({min(valid, key=lambda v: (abs(v - w), v)) for w in wanted})
    return snapped


def make_plan(analysis: GraphAnalysis, flops: dict, ratio: float, schedule, carry: bool = True) -> Plan:
    """The plan for a ratio and a schedule: None / "paper" (ToP's sites, one keep rate solved for
    ratio), "uniform" (a site after every block that allows one, one keep rate), "top" or a dict.
    ("auto" is searched by ``search.schedule.search_schedule``, which calls back into this.)
    ``carry``: reruns_carried_chain(settings)."""
    dense = sum(flops.values())
    if ratio == 0 and schedule in (None, "paper", "uniform"):
        return _plan(analysis, flops, {}, dense, carry)
    require_prunable(analysis, f"ratio {ratio}" if schedule in (None, "paper", "uniform") else f"schedule {schedule!r}")
    if schedule not in (None, "paper", "uniform"):
        keeps = _schedule_keeps(analysis, schedule)
        return _plan(analysis, flops, keeps, dense, carry)
    sites = analysis.valid_sites if schedule == "uniform" else default_sites(analysis)
    return plan_for_sites(analysis, flops, sites, ratio, carry)


def plan_for_sites(analysis: GraphAnalysis, flops: dict, sites: list, ratio: float, carry: bool = True) -> Plan:
    """One keep rate at every site in ``sites``, solved so the estimated reduction is closest to
    ``ratio``; UnreachableRatioError when it falls short by more than RATIO_TOLERANCE."""
    dense = sum(flops.values())
    require_prunable(analysis, f"ratio {ratio}")
    if not sites:
        raise UnreachableRatioError(f"ratio {ratio} cannot be reached: no pruning site was given")
    best = _solve_uniform_keep(analysis, flops, sites, ratio, dense, carry)
    achieved = best.estimated_ratio
    if ratio - achieved > RATIO_TOLERANCE:
        raise UnreachableRatioError(
            f"ratio {ratio} cannot be reached for this model: the maximum FLOPs reduction with pruning after "
            f"blocks {sites} is {achieved:.3f} (keeping at least 1/{round(1 / MIN_KEPT_FRACTION)} of the tokens at "
            "every site; too few blocks after the first site, or work that stays dense: the layers before the "
            "first site, restored feature maps and what reads them). Use a smaller ratio, or an explicit "
            "schedule {block: keep_rate} with earlier sites or lower keep rates.")
    return best


def keeps_enough(analysis: GraphAnalysis, plan: "Plan") -> bool:
    """Every site of the plan keeps at least MIN_KEPT_FRACTION of its stage's tokens."""
    return all(k >= min_kept(analysis, key) for key, k in plan.kept.items())


def min_kept(analysis: GraphAnalysis, key: int) -> int:
    """The fewest tokens a solved plan keeps at site `key`: the protected ones, plus MIN_KEPT_FRACTION of
    its stage's tokens (at least one)."""
    length = analysis.site_length(key)
    return min(length, analysis.protected_below(length) + max(1, math.ceil(MIN_KEPT_FRACTION * length)))


def solve_site_keep(analysis: GraphAnalysis, flops: dict, keeps: dict, site: int, ratio: float, carry: bool = True):
    """``keeps`` with the keep rate at ``site`` lowered (bisection) until the estimated reduction is
    closest to ``ratio`` (the caller checks how close that is)."""
    dense = sum(flops.values())
    return _bisect(lambda rate: _plan(analysis, flops, {**keeps, site: rate}, dense, carry), ratio, keeps.get(site, 1.0),
                   lambda plan: keeps_enough(analysis, plan))


def _bisect(plan_for_rate, ratio: float, highest: float, allowed=lambda plan: True, steps: int = 40) -> Plan:
    """The allowed plan closest to ``ratio`` among plan_for_rate(rate), rate in [0, highest] (the
    reduction falls as the rate grows; a plan is not allowed below some rate)."""
    lo, hi = 0.0, highest
    best = plan_for_rate(highest)
    for _ in range(steps):
        mid = (lo + hi) / 2
        plan = plan_for_rate(mid)
        if not allowed(plan):
            lo = mid
            continue
        if abs(plan.estimated_ratio - ratio) < abs(best.estimated_ratio - ratio):
            best = plan
        if plan.estimated_ratio > ratio:
            lo = mid
        else:
            hi = mid
    return best


def _plan(analysis, flops, keeps, dense, carry) -> Plan:
    kept = kept_counts(analysis, keeps)
    return Plan(dict(keeps), kept, tokens_per_block(analysis, kept), dense, estimate(analysis, flops, kept, carry))


def _solve_uniform_keep(analysis, flops, sites, ratio, dense, carry) -> Plan:
    return _bisect(lambda rate: _plan(analysis, flops, {s: rate for s in sites}, dense, carry), ratio, 1.0,
                   lambda plan: keeps_enough(analysis, plan))


def _schedule_keeps(analysis, schedule) -> dict:
    if schedule == "top":
        schedule = {k: TOP_KEEP for k in top_sites(analysis.depth)}
    bad = [k for k in schedule if k not in analysis.valid_sites]
    if bad:
        reasons = "; ".join(f"after block {k}: {analysis.invalid_sites.get(k, 'no such site (the model has ' + str(analysis.depth) + ' SSM blocks)')}"
                            for k in bad)
        raise InvalidArgumentError(f"schedule names sites where pruning is not possible: {reasons}. "
                         f"Possible sites: {analysis.valid_sites}")
    return dict(schedule)


def require_prunable(analysis: GraphAnalysis, asked: str) -> None:
    """UnsupportedModelError when no site of the model can be pruned (what was `asked` for cannot
    be done on any schedule), naming the first block that stops it and why."""
    if analysis.valid_sites:
        return
    if analysis.depth < 2:
        why = (f"the model has {analysis.depth} SSM block(s), and pruning needs a block after the site "
               "(tokens pruned after the last block save nothing)")
    else:
        key, reason = min(analysis.invalid_sites.items())
        block = analysis.blocks[key - 1]
        others = "; ".join(f"after block {k}: {r}" for k, r in sorted(analysis.invalid_sites.items())[1:3])
        why = (f"the first possible site, after block {key} ({block.name}), is refused: {reason}"
               + (f"; and {others}" if others else ""))
    raise UnsupportedModelError(
        f"{asked} cannot be applied: nothing in this model can be pruned ({why}). With ratio=0 the "
        "model compiles densely, and its `.report` lists every site with the reason it is refused.")
