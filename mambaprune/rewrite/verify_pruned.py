"""Verify a pruned run: the real pruned graph, at the real keep counts, on the example inputs.

The keep-all check (verify.py) cannot see a rewrite that is right when nothing is dropped and wrong
otherwise (an output restored at the wrong index, the wrong inverse of a scan order, a conv window
that ignores the gaps). This one runs the pruned graph itself, reads back the positions every site
kept, and checks every graph output (tuple / list / dict outputs flattened):

1. an output no site feeds (the analysis' `Site.fed`, masked_hold.fed_by_sites: not on the way from a site to
   a later token mixer nor computed from such a node; an early feature map, an auxiliary head reading a
   site's block output) equals the dense graph's output:
   relative difference <= DENSE_TOLERANCE in fp32 (they compute the same ops on the same values),
   `verify_tolerance` in float16 / bfloat16;
2. an output a site feeds equals the second formulation of the alignment (masked_hold.MaskedHold under
   `hold` and `decay`: the dense graph with the pruned tokens masked; masked_compacted.MaskedCompacted
   under `none` and `none-unsorted`: the same in each site's compacted coordinates, where the kept
   tokens hold the first K positions) at the positions kept by
   the last site that feeds it (token outputs) or wholly (pooled and read-out outputs, values
   after a restored stage, token outputs restored with fill "zeros" or "nearest", and the outputs
   of a neck or decoder run on tokens restored with those fills), within MASKED_TOLERANCE in fp32,
   `verify_tolerance` in halves. Outputs behind something the formulation does not define
   (attention spelled out as matmuls, directions folded into one scan whose operands are in different orders,
   a decoder reading tokens restored with "carry", a class token cut out of the tokens under `none`,
   a stage restored with "carry" under a merge, ...) are not compared: the result says which and why.
   Under reduction="merge-*" the stream's parts crossing each site are read merged (masked_merge.py).
Besides, the kept positions of every site the pruned graph computes them for (a site followed by
attention only may not need them) must be valid: K distinct positions in range per sample,
the protected ones among them, sorted (but under `none-unsorted`), within a subset of the previous
site's of the same stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..analysis import GraphAnalysis, Grid, Tok, fact_of
from ..errors import UnsupportedModelError
from ..settings import Alignment, PruneSettings
from .masked_compacted import MaskedCompacted
from .masked_hold import MaskedHold, fed_by_sites
from .masks import keep_mask, mask_like
from .select import run_recording_kept
from .verify import relative_difference, verify_tolerance

DENSE_TOLERANCE = 1e-6    # fp32 and wider: values no site feeds
# fp32 and wider: pruned run vs masked run. Measured on the test models (2026-12-06): at most about
# 2e-7 of the output's magnitude (the gathers and the shorter scans reassociate sums); the keep-all
# check's 1e-4 would hide a small fault (decay's gaps ignored moved a tiny ViM's logits by 8e-5).
MASKED_TOLERANCE = 1e-5


@dataclass(frozen=True)
class OutputCheck:
    index: int               # in the flattened graph outputs
    name: str                # the dense graph's output node
    compared_with: str       # "dense", "masked" or "" (not compared)
    where: str               # "all positions", "kept positions of site k"
    difference: float = 0.0  # relative_difference where compared
    tolerance: float = 0.0
    skipped: str = ""        # why it was not compared


@dataclass(frozen=True)
class PrunedRunCheck:
    """What verify_pruned_run compared (and what not), and its cost."""

    alignment: str
    sites: dict              # site key -> K
    outputs: tuple           # OutputCheck per flattened graph output
    seconds: float

    @property
    def unchecked(self) -> list:
        return [o for o in self.outputs if not o.compared_with]

    def describe(self) -> str:
        lines = [f"pruned-run check ({self.alignment}, sites {self.sites}, {self.seconds:.2f} s):"]
        for o in self.outputs:
            if o.compared_with:
                lines.append(f"  output {o.index} ({o.name}): vs {o.compared_with} at {o.where}, "
                             f"rel. diff {o.difference:.2g} <= {o.tolerance:.2g}")
            else:
                lines.append(f"  output {o.index} ({o.name}): not compared: {o.skipped}")
        return "\n".join(lines)


def verify_pruned_run(gm: fx.GraphModule, pruned: fx.GraphModule, analysis: GraphAnalysis, sites: list,
                      flat: list, settings: PruneSettings) -> PrunedRunCheck:
    """Raise UnsupportedModelError when the pruned graph `pruned` (rewritten from `gm` for `sites`,
    SiteSpec) computes, on `flat`, something its definition does not (module docstring)."""
    started = time.perf_counter()
    keys = [s.key for s in sorted(sites, key=lambda s: s.key)]
    with torch.no_grad():
        got, kept = run_recording_kept(pruned, flat)
        check_kept_positions(kept, sites, analysis, settings.alignment)
        keep = {key: keep_mask(kept[key], analysis.site_length(key)) for key in keys if key in kept}
        dense = fx.Interpreter(gm).run(*flat)
        fed = fed_by_sites(analysis, keys)
        masked_run = masked_formulation(analysis, kept, keep, settings, fed)
        masked = pytree.tree_leaves(masked_run.run(*flat))
    outputs = _output_nodes(gm)
    dense, got = pytree.tree_leaves(dense), pytree.tree_leaves(got)
    if not (len(outputs) == len(dense) == len(got) == len(masked)):
        raise UnsupportedModelError(f"the pruned graph returns {len(got)} values, the model {len(dense)}: "
                                    "please report the model")
    checks = []
    for index, (node, e, g, m) in enumerate(zip(outputs, dense, got, masked)):
        checks.append(_check_output(index, node, e, g, m, fed, keep, masked_run, settings))
    return PrunedRunCheck(str(settings.alignment), {s.key: s.keep for s in sites}, tuple(checks),
                          time.perf_counter() - started)


def masked_formulation(analysis: GraphAnalysis, kept: dict, keep: dict, settings: PruneSettings,
                       fed: dict) -> MaskedHold:
    """The second formulation of the alignment that outputs a site feeds are compared with: the dense graph
    with the pruned tokens masked (hold, decay) or in each site's compacted coordinates (the `none` modes),
    the stream's parts merged at each site under a merging reduction (masked_merge.py)."""
    kept = {key: kept[key] for key in keep}
    if settings.alignment.claims_positions:
        merge = (settings.reduction, kept) if settings.reduction.merges else None
        return MaskedHold(analysis, keep, settings.alignment, settings.fill, fed, merge)
    return MaskedCompacted(analysis, kept, settings.fill, fed, settings.reduction)


def _output_nodes(gm: fx.GraphModule) -> list:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(output.args[0])


def check_kept_positions(kept: dict, sites: list, analysis: GraphAnalysis, alignment: Alignment) -> None:
    """Refuse kept positions that no selection may produce (module docstring)."""
    previous = None          # (the last site's key, its kept mask)
    for site in sorted(sites, key=lambda s: s.key):
        length, positions = analysis.site_length(site.key), kept.get(site.key)
        problem = None
        if positions is None:   # nothing in the pruned graph reads them (a site followed by attention only)
            continue
        if positions.shape[1] != site.keep:
            problem = f"it keeps {positions.shape[1]} tokens, the plan {site.keep}"
        elif positions.min() < 0 or positions.max() >= length:
            problem = f"a kept position is outside 0..{length - 1}"
        elif alignment.keeps_order and not bool((positions[:, 1:] > positions[:, :-1]).all()):
            problem = "the kept positions are not strictly increasing"
        if problem is None:
            mask = keep_mask(positions, length)
            protected = [p for p in analysis.protected if p < length]
            if int(mask.sum()) != positions.numel():
                problem = "a position is kept twice"
            elif protected and not bool(mask[:, protected].all()):
                problem = f"a protected position ({protected}: class tokens, read-out positions) is pruned"
            elif previous is not None and analysis.same_stage(previous[0], site.key) \
                    and not bool(mask[~previous[1]].logical_not().all()):
                problem = "it keeps a token that an earlier site of its stage pruned"
            previous = (site.key, mask)
        if problem:
            raise UnsupportedModelError(
                f"mambaprune pruned this model wrongly: at the site after block {site.key}, {problem}. This is a "
                "bug in mambaprune; please report the model (verify=False skips the check at your own risk).")


def _check_output(index, node, expected, got, masked, fed, keep, masked_run, settings) -> OutputCheck:
    name = node.name if isinstance(node, fx.Node) else repr(node)
    if not isinstance(expected, torch.Tensor) or not isinstance(node, fx.Node):
        return OutputCheck(index, name, "", "", skipped="not a tensor")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        _refuse(index, name, "the model", f"has shape {tuple(getattr(got, 'shape', ()))}, "
                f"the model's {tuple(expected.shape)}", settings)
    feeding = [key for key, nodes in fed.items() if node in nodes]
    if not feeding:
        tolerance = DENSE_TOLERANCE if _is_wide(expected.dtype) else verify_tolerance(expected.dtype)
        difference = relative_difference(expected, got)
        if not difference <= tolerance:
            _refuse(index, name, "the model (no pruning site feeds it: it must be the dense value)",
                    f"differs by {difference:.3g} of its magnitude (allowed {tolerance:.3g}; "
                    f"{_positions_differing(expected, got)})", settings)
        return OutputCheck(index, name, "dense", "all positions", difference, tolerance)
    if node in masked_run.untrusted:
        return OutputCheck(index, name, "", "", skipped=f"fed by sites {feeding}: {masked_run.untrusted[node]}")
    behind = [key for key in feeding if key in masked_run.analysis.sites and node in masked_run.analysis.sites[key].restored]
    key = masked_run.site_of.get(node)
    if key is not None and key not in keep:
        return OutputCheck(index, name, "", "", skipped=f"the positions kept by the site after block {key} are "
                           "not computed by the pruned graph")
    fact = fact_of(node)
    where, select = "all positions", None
    restored, sites = None, masked_run.analysis.sites
    if not behind and key is not None:
        # the last site whose kept tokens it holds: a map read at a site and reaching no later mixer holds the
        # earlier sites' tokens (`Site.fed`), and none when read at the first (dense in both runs)
        held = [k for k in feeding if k <= key and k in sites and node in sites[k].fed]
        key = max(held) if held else None
    if not behind and key is not None and isinstance(fact, (Tok, Grid)):    # a token output: restored as the fill says
        restored, _ = masked_run.restored(node, masked, masked_run.stage_keys(key), carry_or_nearest=True)
    if restored is not None:      # every position is defined
        masked, where = restored, f"all positions (fill={settings.fill} at those the site after block {key} pruned)"
    elif not behind and key is not None and isinstance(fact, (Tok, Grid)):
        select = mask_like(fact, tuple(expected.shape), keep[key])
        if select is None:
            return OutputCheck(index, name, "", "", skipped=f"fed by site {key}: its token axis could not be masked")
        select = select.expand_as(expected)
        where = f"the positions kept by the site after block {key}"
    want, have = (masked, got) if select is None else (masked[select], got[select])
    tolerance = MASKED_TOLERANCE if _is_wide(expected.dtype) else verify_tolerance(expected.dtype)
    difference = relative_difference(want, have)
    if not difference <= tolerance:
        _refuse(index, name, f"its definition under alignment='{settings.alignment}' (the dense graph run with "
                "the pruned tokens masked)", f"differs at {where} by {difference:.3g} of its magnitude "
                f"(allowed {tolerance:.3g}; {_positions_differing(want, have)})", settings)
    return OutputCheck(index, name, "masked", where, difference, tolerance)


def _is_wide(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point or torch.finfo(dtype).eps <= torch.finfo(torch.float32).eps


def _positions_differing(expected: torch.Tensor, got: torch.Tensor) -> str:
    close = torch.isclose(expected.float(), got.float(), rtol=1e-5, atol=1e-6)
    return f"{int((~close).sum())} of {close.numel()} values differ"


def _refuse(index: int, name: str, reference: str, how: str, settings: PruneSettings) -> None:
    raise UnsupportedModelError(
        f"mambaprune pruned this model wrongly: on the example inputs, at the real keep counts, graph output "
        f"{index} ({name}), compared with {reference}, {how}. This is a bug in mambaprune's rewrite of this "
        f"model: please report it. Meanwhile, other sites (schedule=) or alignment= / fill= than "
        f"'{settings.alignment}' / '{settings.fill}' may avoid it; verify=False skips the check at your own "
        "risk.")
