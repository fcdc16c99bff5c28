"""Rewrite: the token-pruning passes (prune, propagate meta) and the keep-all verification."""
from .propagate_meta import PropagateMeta
from .prune_tokens import PruneTokens, SiteSpec, prune_tokens
from .verify import verify_rewrite

__all__ = ["PropagateMeta", "PruneTokens", "SiteSpec", "prune_tokens", "verify_rewrite"]
