"""Rewrite: the token-pruning passes (prune, propagate meta), the keep-all and pruned-run verifications
and the clean-up of what the pruned model's input checks make redundant (drop no-ops)."""
from .drop_no_ops import DropNoOps
from .propagate_meta import PropagateMeta
from .prune_tokens import PruneTokens, SiteSpec, prune_tokens
from .verify import verify_rewrite
from .verify_pruned import PrunedRunCheck, verify_pruned_run

__all__ = ["DropNoOps", "PropagateMeta", "PruneTokens", "SiteSpec", "prune_tokens", "verify_rewrite",
           "PrunedRunCheck", "verify_pruned_run"]
