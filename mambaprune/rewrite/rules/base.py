"""The shape every rewrite rule shares: does it apply to this node, and what does it emit."""
from __future__ import annotations

import abc

import torch.fx as fx

from ..context import SiteContext


class RewriteRule(abc.ABC):
    """One way of re-emitting a node of a pruned region; the driver tries the rules in order."""

    @abc.abstractmethod
    def matches(self, ctx: SiteContext, old: fx.Node, args: tuple) -> bool:
        """Whether the rule applies to the old node `old`, whose arguments cut to the site are `args`."""

    @abc.abstractmethod
    def emit(self, ctx: SiteContext, old: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        """The new node (its state marked in ctx.state when it holds pruned tokens)."""

    def __repr__(self) -> str:
        return type(self).__name__


def pruned_input(ctx: SiteContext, args: tuple):
    """The pruned state of the first argument, if it holds pruned tokens."""
    return ctx.state.of(args[0]) if args else None
