"""Token-axis propagation: a registry of per-op token rules (one file per op family) and the driver."""
from .propagate import TokenFlow, TokenRuleError, propagate_tokens
from .registry import rule_for, token_rule

__all__ = ["TokenFlow", "TokenRuleError", "propagate_tokens", "rule_for", "token_rule"]
