"""Sites: after which blocks tokens may be pruned, and why not after the others.

Site k follows the first k blocks. It is possible only when nothing downstream of block k-1's
end does something to the tokens that the rewrite cannot follow (`Unknown`), no odd token tensor
crosses it, and, in a hierarchical model, the stage it lies in can be made whole again before its
downsampling (a `StageEnd`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch.fx as fx

from .blocks import Block, in_module
from .facts import BatchTok, Grid, MultiTok, PaddedTok, Tok, Unknown, fact_of
from .ops import LAYOUT_OPS, is_assert, op_name, shape_of


@dataclass
class StageEnd:
    """Where a pruned stage ends: `downsampling` (a conv2d that changes the token grid) reads the
    stage's last token tensor `restore` through the layout-only ops `chain` (transposes, reshapes to
    the grid; empty for a grid stream); the rewrite makes `restore` whole again (rewrite/stage_end.py)."""
    downsampling: fx.Node
    restore: fx.Node
    chain: list


@dataclass
class Site:
    """A possible site: the dense part before it (`cut`, ancestor-closed), and for a site in a
    stage of a hierarchical model, the stage's end and the nodes after that downsampling."""
    key: int
    cut: set
    stage_end: Optional[StageEnd] = None
    after_stage: set = field(default_factory=set)


@dataclass
class NotUnderstoodNode:
    name: str       # the module that holds the node
    reason: str


def module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path or "<top level>"


def collect_not_understood(gm: fx.GraphModule) -> list:
    """One entry per first Unknown node (its descendants inherit the reason)."""
    out = []
    for node in gm.graph.nodes:
        fact = fact_of(node)
        if not isinstance(fact, Unknown) or any(isinstance(fact_of(a), Unknown) for a in node.all_input_nodes):
            continue
        out.append(NotUnderstoodNode(module_of(node), f"{node.name}: {fact.reason}"))
    return out


def find_sites(gm: fx.GraphModule, blocks: list, barriers: list, graph: nx.DiGraph, order: dict) -> tuple:
    """({key: Site}, {key: reason}) for the site after every block but the last (and after the last
    when layers without a scan follow it on the tokens: MambaVision's attention blocks)."""
    sites, invalid = {}, {}
    unknown = [n for n in gm.graph.nodes if isinstance(fact_of(n), Unknown)]
    barriers = sorted(barriers, key=order.__getitem__)
    for block in blocks:
        key = block.index + 1
        if key == len(blocks) and (block.y is None or not works_after(block_closure(block, gm, graph), gm.graph.nodes)):
            continue
        if block.y is None:
            unknown_scan = next((fact_of(s) for s in block.scans if isinstance(fact_of(s), Unknown)), None)
            invalid[key] = (f"block {block.name}: {unknown_scan.reason}" if unknown_scan else
                            f"block {block.name}: its scan outputs never merge into one token tensor")
            continue
        cut = block_closure(block, gm, graph)
        end = next((b for b in barriers if b not in cut), None)
        after = nx.descendants(graph, end) if end is not None else set()
        reason = site_problem(cut, [n for n in unknown if n not in after], block.token_length, gm.graph.nodes)
        stage_end = None
        if not reason and end is not None:
            stage_end = describe_stage_end(end, cut)
            next_length = blocks[key].token_length if key < len(blocks) else None
            if next_length != block.token_length and not works_after(cut, nx.ancestors(graph, end)):
                reason = (f"block {block.name} is the last of its stage: no block before the downsampling "
                          f"{module_of(end)} would run on fewer tokens")
            else:
                reason = stage_end_problem(stage_end, cut, after, block.token_length, gm.graph.nodes)
        if reason:
            invalid[key] = reason
            continue
        sites[key] = Site(key, cut, stage_end, after if stage_end is not None else set())
    return sites, invalid


def works_after(cut: set, nodes) -> bool:
    """Whether attention runs on the tokens among `nodes` outside the dense part `cut` (a
    scaled_dot_product_attention, or a matmul of two token tensors): blocks without a scan, as
    MambaVision's attention blocks after its mixers, that would run on fewer tokens."""
    for node in nodes:
        if node in cut or not isinstance(fact_of(node), (Tok, Grid)):
            continue
        name = op_name(node)
        if name == "aten::scaled_dot_product_attention" or (
                name in ("aten::matmul", "aten::bmm") and all(fact_of(a) is not None for a in node.args[:2])):
            return True
    return False


def block_closure(block: Block, gm: fx.GraphModule, graph: nx.DiGraph) -> set:
    """Everything up to the end of the block: ancestors of y and of every node of its repeated module.

    Keeping the whole block dense (e.g. a depthwise conv after the residual add, as in PlainMamba-L1)
    makes a site 'after the first k blocks' mean what it says.
    """
    ends = {block.y}
    if block.container:
        ends.update(node for node in gm.graph.nodes if in_module(node, block.container))
    cut = set(ends)
    for node in ends:
        cut |= nx.ancestors(graph, node)
    return cut


def describe_stage_end(end: fx.Node, cut: set) -> StageEnd:
    """Walk back from the downsampling's input through single-use layout ops to the stage's stream."""
    restore, chain = end.args[0], []
    while (isinstance(restore, fx.Node) and restore not in cut and op_name(restore) in LAYOUT_OPS
           and len(restore.users) == 1 and isinstance(restore.args[0], fx.Node)):
        chain.insert(0, restore)
        restore = restore.args[0]
    return StageEnd(end, restore, chain)


def stage_end_problem(stage_end: StageEnd, cut: set, after: set, length: int, nodes) -> Optional[str]:
    """Why the pruned stage could not be restored before its downsampling (None: it can): the
    restore puts the kept tokens of `stage_end.restore` back at their places in the full tensor,
    and that is all the next stage may receive from the pruned one."""
    end, restore = stage_end.downsampling, stage_end.restore
    fact = fact_of(restore)
    if not isinstance(fact, (Tok, Grid)) or fact.layout.length != length or restore in cut:
        return (f"the downsampling {module_of(end)} reads {restore.name}, which is not the token stream of the "
                "pruned stage: sites are possible inside the last stage only")
    for node in (n for n in nodes if n in after):
        for arg in node.all_input_nodes:
            if arg is end or arg in after or arg in cut or arg.op != "call_function":
                continue
            if fact_of(arg) is not None:
                return _strided_reads(end, nodes) or (
                    f"{arg.name} reaches {module_of(node)} in the next stage without going through the "
                    f"downsampling {module_of(end)}: only the downsampling's input can be restored")
    return None


def _strided_reads(end: fx.Node, nodes) -> Optional[str]:
    """The refusal for a downsampling that reads the grid through several strided slices (VMamba
    v0's PatchMerging2D: x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], ...); None for another one."""
    if op_name(end) != "aten::slice":
        return None
    module = module_of(end)
    slices = [n.name for n in nodes if op_name(n) == "aten::slice" and module_of(n) == module
              and isinstance(n.args[-1], int) and len(n.args) == 5 and n.args[-1] > 1]
    return (f"the downsampling {module} reads the stage's grid through {len(slices)} strided slices "
            f"({', '.join(slices)}: PatchMerging2D's x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], ...), and only a "
            "downsampling with one input can be restored: sites are possible inside the last stage only "
            "(a strided conv2d downsampling, as VMamba v05_noz's, can be restored)")


def crosses(node: fx.Node, cut: set) -> bool:
    """Whether `node`, in the dense part `cut`, is read after it (metadata asserts do not count)."""
    return any(u not in cut and not is_assert(u) for u in node.users)


def site_problem(cut: set, unknown: list, length: int, nodes) -> Optional[str]:
    """Why no site can follow the dense part `cut` (None: one can); `nodes` in graph order."""
    later_unknown = [n for n in unknown if n not in cut]
    if later_unknown:
        first = later_unknown[0]
        return f"after it, {module_of(first)} does something the compiler cannot rewrite ({fact_of(first).reason})"
    for node in (n for n in nodes if n in cut):
        fact = fact_of(node)
        if not crosses(node, cut):
            continue
        if isinstance(fact, (PaddedTok, BatchTok, MultiTok)):
            return f"{node.name} crosses the site as a {type(fact).__name__}"
        if isinstance(fact, Grid) and fact.layout.length != length:
            return f"{node.name} crosses the site as a grid of another stage"
        shape = shape_of(node)
        if fact is None and shape and len(shape) > 1 and not isinstance(shape[0], int) \
                and node.op == "call_function" and _holds_tokens(shape, length):
            return f"{node.name} has {length} rows but its token axis could not be followed"
    return None


def _holds_tokens(shape, length: int) -> bool:
    """A dim of `length`, or two adjacent static dims whose product is `length` (an untracked grid)."""
    if length in shape[1:]:
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a * b == length and a > 1 and b > 1
               for a, b in zip(shape[1:], shape[2:]))
