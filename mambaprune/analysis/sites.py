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

from ..meta_keys import module_of
from .blocks import Block, in_module
from .facts import BatchTok, Grid, MultiTok, PaddedTok, Readout, Tok, TokenMap, Unknown, fact_of
from .ops import LAYOUT_OPS, TOKEN_CONVS, is_assert, is_scan, looks_at_neighbours, op_name, shape_of


@dataclass
class StageEnd:
    """Where a pruned stage ends: `downsampling` (a conv2d that changes the token grid) reads the
    stage's last token tensor `restore` through the layout-only ops `chain` (transposes, reshapes to
    the grid; empty for a grid stream); the rewrite makes `restore` whole again (rewrite/stage_end.py).
    `readers`: the other slices and layout ops that carry `restore` into the downsampling beside
    `chain` (PatchMerging2D's x[:, 0::2, 0::2], x[:, 1::2, 0::2], ...: the first is `downsampling`,
    the others read the same grid); they run on the restored grid too."""
    downsampling: fx.Node
    restore: fx.Node
    chain: list
    readers: frozenset = frozenset()

    def runs_on_restored(self, node: fx.Node) -> bool:
        """Whether `node` runs on the restored stream: the downsampling, its chain or another reader."""
        return node is self.downsampling or node in self.chain or node in self.readers

    def reading_restore(self) -> tuple:
        """Those of them that read `restore` itself (the others read these)."""
        return tuple(n for n in (*self.chain, self.downsampling, *self.readers) if self.restore in n.all_input_nodes)


@dataclass
class Site:
    """A possible site: the dense part before it (`cut`, ancestor-closed), the part it feeds (`fed`,
    descendant-closed: see `fed_by_site`), and for a site in a stage of a hierarchical model, the
    stage's end and the nodes after that downsampling. A node in neither (a feature map read before
    the site, an auxiliary head on early blocks) is computed densely, exactly as the model does."""
    key: int
    cut: set
    stage_end: Optional[StageEnd] = None
    after_stage: set = field(default_factory=set)
    fed: set = field(default_factory=set)
    restored: set = field(default_factory=set)    # fed nodes that run densely on restored tokens (`restored_tail`)


@dataclass
class NotUnderstoodNode:
    name: str       # the module that holds the node
    reason: str


def collect_not_understood(gm: fx.GraphModule, restored: set = frozenset()) -> list:
    """One entry per first Unknown node (its descendants inherit the reason), but for those that never run
    on kept tokens (`restored`: dense before every site, or on restored tokens after it: a decoder's
    interpolation)."""
    out = []
    for node in gm.graph.nodes:
        fact = fact_of(node)
        if not isinstance(fact, Unknown) or node in restored \
                or any(isinstance(fact_of(a), Unknown) for a in node.all_input_nodes):
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
        inside = downsampling_inside(block, cut, barriers, graph)
        if inside is not None:
            invalid[key] = (f"block {block.name} ends with the downsampling {module_of(inside)}: its scan's output "
                            "scores the tokens of the stage before it, not the ones crossing the site")
            continue
        work = token_work(blocks[key:], cut, gm.graph.nodes)
        fed = fed_by_site(cut, work, gm.graph.nodes)
        end = next((b for b in barriers if b not in cut), None)
        after = nx.descendants(graph, end) if end is not None else set()
        restored = restored_tail(fed, work, gm.graph.nodes) - after      # dense after the stage end anyway
        reason = site_problem(cut, fed, [n for n in unknown if n not in after and n not in restored],
                              block.token_length, gm.graph.nodes) or restore_problem([n for n in gm.graph.nodes if n in restored], fed, batch_of(gm), block)
        stage_end = None
        if not reason and end is not None:
            stream = {fact_of(n) for n in crossing(cut, fed, block.token_length, gm.graph.nodes)}
            stage_end = describe_stage_end(end, cut, after, gm.graph.nodes, stream)
            next_length = blocks[key].token_length if key < len(blocks) else None
            if next_length != block.token_length and not works_after(cut, nx.ancestors(graph, end)):
                reason = (f"block {block.name} is the last of its stage: no block before the downsampling "
                          f"{module_of(end)} would run on fewer tokens")
            else:
                reason = stage_end_problem(stage_end, cut, after, block.token_length, gm.graph.nodes, graph)
        if reason:
            invalid[key] = reason
            continue
        sites[key] = Site(key, cut, stage_end, after if stage_end is not None else set(), fed, restored)
    return sites, invalid


def downsampling_inside(block: Block, cut: set, barriers: list, graph: nx.DiGraph) -> Optional[fx.Node]:
    """The downsampling that the block itself ends with (in its dense part `cut`, after its scans: Mamba-ND's
    PatchMerging inside the last block of a stage), or None."""
    after_scans = set().union(*(nx.descendants(graph, scan) for scan in block.scans))
    return next((b for b in barriers if b in cut and b in after_scans), None)


def reaches(work: set, order: list) -> set:
    """The nodes of `order` (graph order) on a path to a node of `work`, `work` included."""
    reaching = set(work)
    for node in reversed(order):
        if node not in reaching and any(user in reaching for user in node.users):
            reaching.add(node)
    return reaching


def restored_tail(fed: set, work: set, nodes) -> set:
    """The fed nodes that run densely, on tokens restored to full length (rewrite/restore.py): each node after
    the last token mixer that must see the whole map (a neck's or decoder's conv2d, an interpolation,
    anything the token rules cannot follow: `runs_on_kept_tokens`), and everything computed from it. Before
    them the kept tokens flow on (norms, projections, a pooling head), after them the model's own dense ops
    run on a full feature map. `nodes` in graph order."""
    order = list(nodes)
    reaching = reaches(work, order)
    tail = [n for n in order if n in fed and n not in reaching]
    restored = set()
    for node in tail:
        if any(arg in restored for arg in node.all_input_nodes) or not runs_on_kept_tokens(node):
            restored.add(node)
    for node in reversed(tail):   # moves that cut a map out of the tokens (a class token dropped) on the way to
        if _is_token_map(node) and any(user in restored for user in node.users):   # it run on restored tokens too
            restored.add(node)
    for node in tail:
        if any(arg in restored for arg in node.all_input_nodes):
            restored.add(node)
    return restored


def runs_on_kept_tokens(node: fx.Node) -> bool:
    """A node after the last token mixer that may run on the kept tokens alone: anything the token rules
    follow (per-token ops, readouts, folded directions merged back), but not a conv that looks at
    neighbours (a neck's or decoder's) nor what the rules cannot follow (an interpolation of the map)."""
    if isinstance(fact_of(node), Unknown):
        return False
    return op_name(node) not in TOKEN_CONVS or not looks_at_neighbours(node)


def _is_token_map(node: fx.Node) -> bool:
    fact = fact_of(node)
    return any(isinstance(part, TokenMap) for part in (fact if isinstance(fact, tuple) else (fact,)))


def is_per_token(node: fx.Node) -> bool:
    """A node whose output token j depends on input token j only (a norm, a projection, a pointwise op, a
    layout op): nothing that mixes tokens (a scan, a conv looking at neighbours, attention, a token reduction)."""
    return isinstance(fact_of(node), (Tok, Grid)) and _mixes_nothing(node)


def _mixes_nothing(node: fx.Node) -> bool:
    if is_scan(node) or is_token_attention(node):
        return False
    return op_name(node) not in TOKEN_CONVS or not looks_at_neighbours(node)


def restore_problem(restored: list, fed: set, batch, block: Block) -> Optional[str]:
    """Why the tokens read by the restored part (`restored`, graph order) cannot be restored (None: they can):
    only a token sequence or a grid of the model's batch (`batch`: the graph input's dim 0) comes back at
    full length, from a site whose block runs on that batch (not on windows folded into it)."""
    site_batch = (shape_of(block.y) or (None,))[0]
    if restored and str(site_batch) != str(batch):
        first = restored[0]
        why = f": {fact_of(first).reason}" if isinstance(fact_of(first), Unknown) else ""
        return (f"block {block.name} runs on windows folded into the batch ({site_batch} rows for a batch of "
                f"{batch}), and the tokens it would prune cannot be restored for {module_of(first)} "
                f"({first.name}{why})")
    restored_set = set(restored)
    for node in restored:
        for arg in node.all_input_nodes:
            if arg not in fed or arg in restored_set or fact_of(arg) is None or isinstance(fact_of(arg), Readout):
                continue
            shape = shape_of(arg)
            if not isinstance(fact_of(arg), (Tok, Grid)) or not shape or str(shape[0]) != str(batch):
                return (f"{module_of(node)} reads {arg.name} ({type(fact_of(arg)).__name__}, shape {tuple(shape or ())}) "
                        "after the last token mixer, and only a token sequence or a grid of the model's batch can be "
                        "restored to full length for it")
    return None


def batch_of(gm: fx.GraphModule):
    """Dim 0 of the graph's first tensor input (a symbol when the batch is dynamic)."""
    for node in gm.graph.nodes:
        shape = shape_of(node) if node.op == "placeholder" else None
        if shape:
            return shape[0]
    return None


def token_work(later_blocks: list, cut: set, nodes) -> set:
    """What a site's kept tokens are for: the blocks after it (their scans, their block output, every node of
    their repeated module: a gate branch's conv1d beside the scan), and attention on the tokens outside the
    dense part `cut` (MambaVision's attention blocks after its mixers)."""
    nodes = list(nodes)
    work = {scan for block in later_blocks for scan in block.scans}
    work.update(block.y for block in later_blocks if block.y is not None)
    containers = [block.container for block in later_blocks if block.container]
    work.update(n for n in nodes if n not in cut and any(in_module(n, c) for c in containers))
    work.update(n for n in nodes if n not in cut and is_token_attention(n))
    return work


def fed_by_site(cut: set, work: set, nodes) -> set:
    """The nodes a site after the dense part `cut` feeds: every computed node outside `cut` on a path to
    the token mixers `work`, and everything computed from those. A value computed from the dense part
    alone that reaches no later token mixer (a feature map read before the site, an auxiliary head) is
    not fed, so it stays exactly the dense value. `nodes` in graph order."""
    order = list(nodes)
    reaching = reaches(work, order)
    fed = set()
    for node in order:
        if node.op != "call_function" or node in cut:
            continue
        if node in reaching or any(arg in fed for arg in node.all_input_nodes):
            fed.add(node)
    return fed


def works_after(cut: set, nodes) -> bool:
    """Whether attention runs on the tokens among `nodes` outside the dense part `cut` (a
    scaled_dot_product_attention, or a matmul of two token tensors): blocks without a scan, as
    MambaVision's attention blocks after its mixers, that would run on fewer tokens."""
    return any(node not in cut and is_token_attention(node) for node in nodes)


def is_token_attention(node: fx.Node) -> bool:
    """A scaled_dot_product_attention on token tensors, or a matmul of two token tensors."""
    if not isinstance(fact_of(node), (Tok, Grid)):
        return False
    name = op_name(node)
    return name == "aten::scaled_dot_product_attention" or (
        name in ("aten::matmul", "aten::bmm") and all(fact_of(a) is not None for a in node.args[:2]))


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


def describe_stage_end(end: fx.Node, cut: set, after: set, nodes, stream: set = frozenset()) -> StageEnd:
    """Walk back from the downsampling's input through single-use layout ops to the stage's stream, then
    collect the other readers of that stream on the way into the next stage (`StageEnd.readers`). The walk
    stops at a node laid out as the stream crossing the site (`stream`: its facts), where a block that moves
    its tokens for its scan has moved them back (Mamba-ND's column-major and flipped blocks)."""
    restore, chain = end.args[0], []
    while (isinstance(restore, fx.Node) and restore not in cut and op_name(restore) in LAYOUT_OPS
           and len(restore.users) == 1 and isinstance(restore.args[0], fx.Node) and fact_of(restore) not in stream):
        chain.insert(0, restore)
        restore = restore.args[0]
    return StageEnd(end, restore, chain, _grid_readers(restore, {end, *chain}, after, nodes))


def crossing(cut: set, fed: set, length: int, nodes) -> list:
    """The token tensors of `length` tokens computed in a site's dense part `cut` and read by what it feeds
    (`fed`), in the order of `nodes`: the token stream the next block receives (one tensor, or a hidden and
    a residual part as in ViM)."""
    return [n for n in nodes if n in cut and n.op == "call_function" and isinstance(fact_of(n), (Tok, Grid))
            and fact_of(n).layout.length == length and crosses(n, fed)]


def _grid_readers(restore: fx.Node, taken: set, after: set, nodes) -> frozenset:
    """The slices and layout ops computed from `restore` alone (through each other) that feed `after`
    (the next stage), other than `taken` (the downsampling and its chain)."""
    moves = LAYOUT_OPS | {"aten::slice"}
    candidates = []
    for node in nodes:
        if node in taken or node in after or node.op != "call_function" or op_name(node) not in moves:
            continue
        if all(arg is restore or arg in candidates for arg in node.all_input_nodes) and node.all_input_nodes:
            candidates.append(node)
    readers = set()
    for node in reversed(candidates):
        if any(user in after or user in readers for user in node.users):
            readers.add(node)
    return frozenset(readers)


def stage_end_problem(stage_end: StageEnd, cut: set, after: set, length: int, nodes, graph: nx.DiGraph) -> Optional[str]:
    """Why the pruned stage could not be restored before its downsampling (None: it can): the
    restore puts the kept tokens of `stage_end.restore` back at their places in the full tensor,
    and that is all the next stage may receive from the pruned one. `nodes` in graph order, `graph`
    their data flow."""
    end, restore = stage_end.downsampling, stage_end.restore
    fact = fact_of(restore)
    if not isinstance(fact, (Tok, Grid)) or fact.layout.length != length or restore in cut:
        return (f"the downsampling {module_of(end)} reads {restore.name}, which is not the token stream of the "
                "pruned stage: sites are possible inside the last stage only")
    pruned_stream = nx.descendants(graph, restore) | {restore}
    for node in (n for n in nodes if n in after and n.op != "output"):   # outputs are restored on their own
        for arg in node.all_input_nodes:
            if arg is end or arg in after or arg in cut or arg.op != "call_function" or arg in stage_end.readers:
                continue
            # a token tensor, or anything computed from the pruned stream whose token flow was not
            # inferred (a strided slice of a small grid): either would carry the kept tokens alone
            if fact_of(arg) is not None or arg in pruned_stream:
                return (f"{arg.name} reaches {module_of(node)} in the next stage without going through the "
                        f"downsampling {module_of(end)}: only the downsampling's input can be restored")
    return None


def crosses(node: fx.Node, fed: set) -> bool:
    """Whether `node`, in the dense part of a site, is read by a node the site feeds (`fed`; metadata
    asserts do not count)."""
    return any(u in fed and not is_assert(u) for u in node.users)


def site_problem(cut: set, fed: set, unknown: list, length: int, nodes) -> Optional[str]:
    """Why no site can follow the dense part `cut` that feeds `fed` (None: one can); `nodes` in graph
    order."""
    later_unknown = [n for n in unknown if n in fed]
    if later_unknown:
        first = later_unknown[0]
        return f"after it, {module_of(first)} does something the compiler cannot rewrite ({fact_of(first).reason})"
    for node in (n for n in nodes if n in cut):
        fact = fact_of(node)
        if not crosses(node, fed):
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
