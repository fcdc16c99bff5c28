"""Verify: the rewrite with every token kept must reproduce the dense graph.

An architecture the analysis misreads (a token mixer it did not see) would otherwise be pruned
silently wrong; with every site keeping all its tokens and `hold` alignment the rewritten graph
computes exactly what the dense one does, so any difference beyond float noise is a misreading,
and the model is refused.
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

VERIFY_TOLERANCE = 1e-4


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
        if e.shape != g.shape or not torch.allclose(e.float(), g.float(), rtol=VERIFY_TOLERANCE,
                                                    atol=VERIFY_TOLERANCE * (1 + e.abs().max().item())):
            raise UnsupportedModelError(
                "mambaprune could not rewrite this model faithfully: with every token kept, the rewritten "
                f"graph differs from the model (max abs diff {(e.float() - g.float()).abs().max().item():.3g}). "
                "Please report the model; pass schedule= with later sites to prune only the blocks after the "
                "problem.")
