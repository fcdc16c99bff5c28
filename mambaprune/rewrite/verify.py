"""Verify: the rewrite with every token kept must reproduce the dense graph.

An architecture the analysis misreads (a token mixer it did not see) would otherwise be pruned
silently wrong; with every site keeping all its tokens and `hold` alignment the rewritten graph
computes what the dense one does, up to the order of float operations (gathers and scans of
another form reassociate sums), so any difference beyond that rounding noise is a misreading, and
the model is refused.

The noise follows the outputs' dtype: the check allows `verify_tolerance(dtype)` of the output's
magnitude (max abs diff <= tolerance * (1 + max |expected|), and elementwise rtol the same):
1e-4 in fp32 (and wider), `HALF_EPS_FACTOR` machine epsilons (torch.finfo) in float16 / bfloat16.
Measured on the tiny test models (2026-12-01): the keep-all rewrite differs by at most about
one epsilon of the dtype in fp16 and bf16 relative to that magnitude (README, "Half precision"),
while a misread token mixer differs by a sizeable fraction of the output.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis import GraphAnalysis
from ..capture import run_graph
from ..errors import UnsupportedModelError
from ..pass_infra import run_passes
from ..settings import Alignment, PruneSettings
from .prune_tokens import PruneTokens, SiteSpec

VERIFY_TOLERANCE = 1e-4   # fp32 and wider
HALF_EPS_FACTOR = 4       # float16 / bfloat16: this many epsilons of the output dtype


def verify_tolerance(dtype: torch.dtype) -> float:
    """The relative difference the keep-all check allows for outputs of `dtype`."""
    if not dtype.is_floating_point or torch.finfo(dtype).eps <= torch.finfo(torch.float32).eps:
        return VERIFY_TOLERANCE
    return max(VERIFY_TOLERANCE, HALF_EPS_FACTOR * torch.finfo(dtype).eps)


def relative_difference(expected: torch.Tensor, got: torch.Tensor) -> float:
    """max |expected - got| / (1 + max |expected|), in fp32."""
    e, g = expected.float(), got.float()
    return (e - g).abs().max().item() / (1 + e.abs().max().item()) if e.numel() else 0.0


def verify_rewrite(gm: fx.GraphModule, analysis: GraphAnalysis, sites: list, flat: list,
                   settings: PruneSettings) -> None:
    """Raise UnsupportedModelError when the keep-all rewrite of `sites` differs from `gm` on `flat`."""
    keep_all = [SiteSpec(site.key, analysis.site_length(site.key)) for site in sites]
    check_settings = settings.with_(alignment=Alignment.HOLD, metric="clip")
    check = run_passes([PruneTokens(analysis, keep_all, check_settings)], gm).graph_module
    with torch.no_grad():
        expected = run_graph(gm, flat)
        got = run_graph(check, flat)
    for e, g in zip(expected, got):
        tolerance = verify_tolerance(e.dtype)
        if e.shape != g.shape or not torch.allclose(e.float(), g.float(), rtol=tolerance,
                                                    atol=tolerance * (1 + e.abs().max().item())):
            raise UnsupportedModelError(
                "mambaprune could not rewrite this model faithfully: with every token kept, the rewritten "
                f"graph differs from the model (max abs diff {(e.float() - g.float()).abs().max().item():.3g}, "
                f"allowed {tolerance:.3g} of the output's magnitude in {str(e.dtype).replace('torch.', '')}). "
                "Please report the model; pass schedule= with later sites to prune only the blocks after the "
                "problem.")
