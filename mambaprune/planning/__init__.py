"""Planning: the FLOPs of every node, and ratio (or schedule) -> sites and kept-token counts."""
from .flops import AnnotateFlops, annotate_flops, node_flops, total_flops
from .plan import (MIN_KEPT_FRACTION, RATIO_TOLERANCE, Plan, make_plan, plan_for_sites, require_prunable,
                   reruns_carried_chain, solve_site_keep)

__all__ = ["AnnotateFlops", "MIN_KEPT_FRACTION", "Plan", "RATIO_TOLERANCE", "annotate_flops", "make_plan", "node_flops", "plan_for_sites",
           "require_prunable", "reruns_carried_chain", "solve_site_keep", "total_flops"]
