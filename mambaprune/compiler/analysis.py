"""SSM-block discovery on the captured graph, from the graph alone (no module names, no adapters).

A networkx view of the fx graph gives ancestors/descendants. For every selective-scan node the
analysis finds its block (scans that do not depend on each other form one block: a bidirectional
ViM block has two, PlainMamba four), the block's SSM output `y` (where the block's directions have
merged, followed through the gate up to the output projection: what the importance score reads),
the token mixing it recognised, and whether pruning may happen after it: a site after block b is
possible only when nothing downstream of `y_b` does something to the tokens that the passes cannot
rewrite (`Unknown` in token_flow). Sites are numbered like schedule keys: site k = after the first
k blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch.fx as fx

from .token_flow import (META_KEY, BatchTok, Grid, MultiTok, PaddedTok, Readout, Tok, TokenFlow, Unknown, info_of,
                         is_scan, op_name, propagate_tokens, shape_of)

_FOLLOW_TO_PROJECTION = {"aten::transpose", "aten::permute", "aten::contiguous", "aten::clone", "aten::view",
                         "aten::reshape", "aten::_unsafe_view", "aten::_to_copy", "aten::to"}


@dataclass
class Block:
    index: int
    name: str
    scans: list
    y: Optional[fx.Node]
    mixing: str
    token_length: int
    container: Optional[str] = None   # the repeated module (an item of a ModuleList) holding the scans


@dataclass
class StageEnd:
    """Where a pruned stage ends: `downsampling` (a conv2d that changes the token grid) reads the
    stage's last token tensor `restore` through the layout-only ops `chain` (transposes, reshapes to
    the grid; empty for a grid stream); restore_stage_grid makes `restore` whole again."""
    downsampling: fx.Node
    restore: fx.Node
    chain: list


@dataclass
class NotUnderstood:
    name: str
    reason: str


@dataclass
class GraphAnalysis:
    gm: fx.GraphModule
    blocks: list
    token_length: int
    protected: set
    class_tokens: set
    not_understood: list
    barriers: list = field(default_factory=list)    # downsamplings between stages (token grid changes)
    cuts: dict = field(default_factory=dict)        # site key -> ancestor-closed node set of the dense part
    valid_sites: list = field(default_factory=list)
    invalid_sites: dict = field(default_factory=dict)  # site key -> reason
    stage_ends: dict = field(default_factory=dict)  # site key -> StageEnd of its stage (hierarchical models)
    after_stage: dict = field(default_factory=dict)  # site key -> nodes downstream of that downsampling

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def site_length(self, key: int) -> int:
        """Tokens flowing at a site (the stage of the block it follows)."""
        return self.blocks[key - 1].token_length

    def crossing_tokens(self, key: int) -> list:
        """The token tensors computed before site `key` and used after it, in graph order: the token
        stream the next block receives (one tensor, or a hidden and a residual part as in ViM)."""
        cut, length = self.cuts[key], self.site_length(key)
        return [n for n in self.gm.graph.nodes
                if n in cut and n.op == "call_function" and isinstance(info_of(n), (Tok, Grid))
                and info_of(n).layout.length == length
                and any(u not in cut and not op_name(u).startswith("aten::_assert") for u in n.users)]

    def stream_parts(self, key: int) -> list:
        """crossing_tokens(key) when they are parts of one stream (same token axis, order and shape:
        their sum is what the next block reads); [] otherwise."""
        parts = self.crossing_tokens(key)
        kinds = {(info_of(n), tuple(shape_of(n)[1:])) for n in parts}
        return parts if len(kinds) == 1 else []

    def protected_below(self, length: int) -> int:
        return sum(1 for p in self.protected if p < length)


def analyse(gm: fx.GraphModule) -> GraphAnalysis:
    """Find the SSM blocks of `gm` and the sites after which tokens may be pruned."""
    scans = [n for n in gm.graph.nodes if is_scan(n)]
    if not scans:
        return GraphAnalysis(gm, [], 0, set(), set(), [])
    lengths = {shape_of(s.args[0])[-1] for s in scans}
    flow = propagate_tokens(gm, lengths)
    graph = to_networkx(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks = group_blocks(scans, graph, order)
    analysis = GraphAnalysis(gm, [], max(lengths), set(flow.protected), set(flow.class_tokens), [],
                             barriers=list(flow.barriers))
    for index, members in enumerate(blocks):
        analysis.blocks.append(describe_block(index, members, graph, order))
    analysis.not_understood = collect_not_understood(gm)
    find_sites(analysis, graph, order)
    return analysis


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for user in node.users:
            graph.add_edge(node, user)
    return graph


def group_blocks(scans: list, graph: nx.DiGraph, order: dict) -> list:
    """Consecutive scans that do not depend on one another belong to one block."""
    blocks, current, downstream = [], [], set()
    for scan in sorted(scans, key=order.__getitem__):
        if current and scan in downstream:
            blocks.append(current)
            current, downstream = [], set()
        current.append(scan)
        downstream |= nx.descendants(graph, scan)
    if current:
        blocks.append(current)
    return blocks


def describe_block(index: int, scans: list, graph: nx.DiGraph, order: dict) -> Block:
    y = block_output(scans, graph, order)
    name = block_name(scans)
    return Block(index, name, scans, y, mixing_of(scans, graph), shape_of(scans[0].args[0])[-1],
                 repeated_container(name))


def repeated_container(path: str) -> Optional[str]:
    """'layers.3.mixer' -> 'layers.3': the deepest enclosing module that is an item of a container."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if parts[end - 1].isdigit():
            return ".".join(parts[:end])
    return None


def block_output(scans: list, graph: nx.DiGraph, order: dict) -> Optional[fx.Node]:
    """Where all directions of the block have merged, followed through the gate to the projection."""
    downstream = [nx.descendants(graph, s) | {s} for s in scans]
    common = set.intersection(*downstream)
    reached = directions_reached(scans, set.union(*downstream), order)
    merged = [n for n in sorted(common, key=order.__getitem__) if isinstance(info_of(n), Tok) and reached[n]]
    if not merged:
        return None
    y = merged[0]
    while len(y.users) == 1:
        user = next(iter(y.users))
        if not isinstance(info_of(user), Tok) or user.op != "call_function":
            break
        name = op_name(user)
        pointwise = hasattr(user.target, "tags") and "pointwise" in str(user.target.tags)
        if not (pointwise or name in _FOLLOW_TO_PROJECTION):
            break
        y = user
    return y


def directions_reached(scans: list, nodes: set, order: dict) -> dict:
    """node -> whether every direction of every scan flows into it.

    A scan that folds G directions into one call (MultiTok output) contributes G directions. Each
    node carries, per part of its direction axis, the directions that flow into that part: a slice or
    select of the direction axis keeps some parts, so VMamba's `ys[:, 0]` (row-major and its flip
    only) is not the merged output yet, while `ys[:, 0] + unflipped(ys[:, 1])` is.
    """
    carried = {}
    for scan in scans:
        info = info_of(scan)
        count = len(info.layouts) if isinstance(info, MultiTok) else 1
        carried[scan] = tuple(frozenset({(scan, g)}) for g in range(count))
    for node in sorted(nodes - set(scans), key=order.__getitem__):
        inputs = [carried[a] for a in node.all_input_nodes if a in carried]
        carried[node] = _carry_directions(node, inputs) if inputs else ()
    wanted = {(s, g) for s in scans for g in range(len(carried[s]))}
    return {n: set().union(*carried.get(n, ())) >= wanted for n in nodes}


def _carry_directions(node: fx.Node, inputs: list) -> tuple:
    """Per output part, the directions flowing into it (see directions_reached)."""
    out, source = info_of(node), info_of(node.args[0]) if node.args else None
    everything = frozenset().union(*(frozenset().union(*parts) for parts in inputs))
    if isinstance(source, MultiTok) and op_name(node) in ("aten::slice", "aten::select", "aten::flip"):
        parts = _selected_parts(node, source, inputs[0])
        if parts is not None:
            return parts
    count = len(out.layouts) if isinstance(out, MultiTok) else 1
    if count == 1:
        return (everything,)
    same = [parts for parts in inputs if len(parts) == count]
    if len(same) == len(inputs) and op_name(node) not in ("aten::cat", "aten::stack"):
        return tuple(frozenset().union(*column) for column in zip(*same))
    return tuple(everything for _ in range(count))


def _selected_parts(node: fx.Node, info: MultiTok, parts: tuple) -> Optional[tuple]:
    """The parts of the direction axis that a slice/select keeps, or the flipped order of all."""
    ndim = len(shape_of(node.args[0]))
    if op_name(node) == "aten::flip":
        dims = [d + ndim if d < 0 else d for d in node.args[1]]
        return parts[::-1] if info.gdim in dims else parts
    dim = node.args[1] if len(node.args) > 1 else 0
    if (dim + ndim if dim < 0 else dim) != info.gdim or len(parts) != len(info.layouts):
        return None
    size = shape_of(node.args[0])[info.gdim]
    part = size // len(info.layouts)
    if op_name(node) == "aten::select":
        index = node.args[2] + size if node.args[2] < 0 else node.args[2]
        return (parts[index // part],)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = min(node.args[3], size) if len(node.args) > 3 and node.args[3] is not None else size
    return parts[start // part:-(-end // part)]


def block_name(scans: list) -> str:
    """The innermost module that holds all of the block's scans (from export's nn_module_stack)."""
    paths = []
    for scan in scans:
        stack = scan.meta.get("nn_module_stack") or {}
        paths.append([entry[0] for entry in stack.values()])
    common = []
    for entries in zip(*paths):
        if len(set(entries)) != 1:
            break
        common.append(entries[0])
    name = common[-1] if common else ""
    return name or scans[0].name


def mixing_of(scans: list, graph: nx.DiGraph) -> str:
    """A short description of the token mixing recognised around the scans."""
    layouts = [_describe(info_of(s)) for s in scans]
    parts = [f"{len(scans)} scan{'s' if len(scans) > 1 else ''} ({', '.join(layouts)})"]
    ancestors = set().union(*(nx.ancestors(graph, s) for s in scans))
    convs = sorted({op_name(n).split("::")[-1] for n in ancestors if op_name(n) in ("aten::conv1d", "aten::conv2d")
                    and isinstance(info_of(n), (Tok, Grid, PaddedTok))})
    if convs:
        parts.append("+ " + ", ".join(convs))
    return " ".join(parts)


def _describe(info) -> str:
    if isinstance(info, Tok):
        return info.layout.describe()
    if isinstance(info, MultiTok):
        return f"{len(info.layouts)} directions in one call: " + ", ".join(l.describe() for l in info.layouts)
    return "?"


def collect_not_understood(gm: fx.GraphModule) -> list:
    """One entry per first Unknown node (its descendants inherit the reason)."""
    out = []
    for node in gm.graph.nodes:
        info = info_of(node)
        if not isinstance(info, Unknown):
            continue
        if any(isinstance(info_of(a), Unknown) for a in node.all_input_nodes):
            continue
        out.append(NotUnderstood(module_of(node), f"{node.name}: {info.reason}"))
    return out


def module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path or "<top level>"


def find_sites(analysis: GraphAnalysis, graph: nx.DiGraph, order: dict) -> None:
    unknown = [n for n in analysis.gm.graph.nodes if isinstance(info_of(n), Unknown)]
    barriers = sorted(analysis.barriers, key=order.__getitem__)
    for block in analysis.blocks[:-1]:
        key = block.index + 1
        if block.y is None:
            unknown_scan = next((info_of(s) for s in block.scans if isinstance(info_of(s), Unknown)), None)
            analysis.invalid_sites[key] = (f"block {block.name}: {unknown_scan.reason}" if unknown_scan else
                                           f"block {block.name}: its scan outputs never merge into one token tensor")
            continue
        cut = block_closure(block, analysis.gm, graph)
        end = next((b for b in barriers if b not in cut), None)
        after = nx.descendants(graph, end) if end is not None else set()
        reason = site_problem(cut, [n for n in unknown if n not in after], block.token_length)
        stage_end = None
        if not reason and end is not None:
            stage_end = describe_stage_end(end, cut)
            if analysis.blocks[key].token_length != block.token_length:
                reason = (f"block {block.name} is the last of its stage: no block before the downsampling "
                          f"{module_of(end)} would run on fewer tokens")
            else:
                reason = stage_end_problem(stage_end, cut, after, block.token_length)
        if reason:
            analysis.invalid_sites[key] = reason
            continue
        analysis.cuts[key] = cut
        analysis.valid_sites.append(key)
        if stage_end is not None:
            analysis.stage_ends[key], analysis.after_stage[key] = stage_end, after


_LAYOUT_OPS = {"aten::transpose", "aten::permute", "aten::view", "aten::reshape", "aten::_unsafe_view",
               "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::clone"}


def describe_stage_end(end: fx.Node, cut: set) -> StageEnd:
    """Walk back from the downsampling's input through single-use layout ops to the stage's stream."""
    restore, chain = end.args[0], []
    while (isinstance(restore, fx.Node) and restore not in cut and op_name(restore) in _LAYOUT_OPS
           and len(restore.users) == 1 and isinstance(restore.args[0], fx.Node)):
        chain.insert(0, restore)
        restore = restore.args[0]
    return StageEnd(end, restore, chain)


def stage_end_problem(stage_end: StageEnd, cut: set, after: set, length: int) -> Optional[str]:
    """Why the pruned stage could not be restored before its downsampling (None: it can).

    The restore (passes/restore_stage_grid.py) puts the kept tokens of `stage_end.restore` back at
    their places in the full tensor; that is all the next stage may receive from the pruned one.
    """
    end, restore = stage_end.downsampling, stage_end.restore
    info = info_of(restore)
    if not isinstance(info, (Tok, Grid)) or info.layout.length != length or restore in cut:
        return (f"the downsampling {module_of(end)} reads {restore.name}, which is not the token stream of the "
                "pruned stage: sites are possible inside the last stage only")
    for node in after:
        for arg in node.all_input_nodes:
            if arg is end or arg in after or arg in cut or arg.op != "call_function":
                continue
            if info_of(arg) is not None:
                return (f"{arg.name} reaches {module_of(node)} in the next stage without going through the "
                        f"downsampling {module_of(end)}: only the downsampling's input can be restored")
    return None


def block_closure(block: Block, gm: fx.GraphModule, graph: nx.DiGraph) -> set:
    """Everything up to the end of the block: ancestors of y and of every node of its repeated module.

    Keeping the whole block dense (e.g. a depthwise conv after the residual add, as in PlainMamba-L1)
    makes a site 'after the first k blocks' mean what it says.
    """
    ends = {block.y}
    if block.container:
        prefix = block.container + "."
        for node in gm.graph.nodes:
            paths = [entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()]
            if any(p == block.container or p.startswith(prefix) for p in paths):
                ends.add(node)
    cut = set(ends)
    for node in ends:
        cut |= nx.ancestors(graph, node)
    return cut


def site_problem(cut: set, unknown: list, length: int) -> Optional[str]:
    later_unknown = [n for n in unknown if n not in cut]
    if later_unknown:
        first = later_unknown[0]
        return f"after it, {module_of(first)} does something the compiler cannot rewrite ({info_of(first).reason})"
    for node in cut:
        info = info_of(node)
        if not any(u not in cut for u in node.users):
            continue
        if isinstance(info, (PaddedTok, BatchTok, MultiTok)):
            return f"{node.name} crosses the site as a {type(info).__name__}"
        if isinstance(info, Grid) and info.layout.length != length:
            return f"{node.name} crosses the site as a grid of another stage"
        shape = shape_of(node)
        if info is None and shape and len(shape) > 1 and not isinstance(shape[0], int) and node.op == "call_function" \
                and _holds_tokens(shape, length):
            return f"{node.name} has {length} rows but its token axis could not be followed"
    return None


def _holds_tokens(shape, length: int) -> bool:
    """A dim of `length`, or two adjacent static dims whose product is `length` (an untracked grid)."""
    if length in shape[1:]:
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a * b == length and a > 1 and b > 1
               for a, b in zip(shape[1:], shape[2:]))


__all__ = ["analyse", "GraphAnalysis", "Block", "StageEnd", "NotUnderstood", "Readout", "TokenFlow", "META_KEY"]
