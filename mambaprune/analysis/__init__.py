"""Analysis: what the captured graph does to its tokens (token facts on every node, by per-op
rules), its SSM blocks, and the sites after which tokens may be pruned."""
from .facts import (BatchTok, Grid, MultiGrid, MultiTok, NotUnderstood, PaddedTok, Readout, Tok, TokenMap, Unknown, fact_of,
                    is_token_fact, multi)
from .graph_analysis import AnalyseGraph, Block, GraphAnalysis, NotUnderstoodNode, Site, StageEnd, analyse
from .layout import Layout

__all__ = ["AnalyseGraph", "BatchTok", "Block", "GraphAnalysis", "Grid", "Layout", "MultiGrid", "MultiTok", "NotUnderstood",
           "NotUnderstoodNode", "PaddedTok", "Readout", "Site", "StageEnd", "Tok", "TokenMap", "Unknown", "analyse",
           "fact_of", "is_token_fact", "multi"]
