"""SSM blocks, from the graph alone: which scans form a block, where its directions merge (`y`,
what the importance score reads), its name and the token mixing recognised around it.

Scans that do not depend on each other form one block (a bidirectional ViM block has two,
PlainMamba four). A block's `y` is the first token tensor every direction of every scan flows
into, followed through the gate up to the output projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .facts import Grid, MultiTok, PaddedTok, Tok, Unknown, fact_of
from .ops import TO_PROJECTION_OPS, TOKEN_CONVS, argument, is_pointwise, norm_dim, op_name, scan_length, shape_of


@dataclass
class Block:
    index: int
    name: str
    scans: list
    y: Optional[fx.Node]
    mixing: str
    token_length: int
    container: Optional[str] = None   # the repeated module (an item of a container) holding the scans


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
    name = block_name(scans)
    container = repeated_container(name)
    return Block(index, name, scans, block_output(scans, graph, order), mixing_of(scans, graph, container or name),
                 scan_length(scans[0]), container)


def repeated_container(path: str) -> Optional[str]:
    """'layers.3.mixer' -> 'layers.3': the deepest enclosing module that is an item of a container."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if parts[end - 1].isdigit():
            return ".".join(parts[:end])
    return None


def module_paths(node: fx.Node) -> list:
    """The qualified names of the modules whose forward created `node`, outermost first."""
    return [entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()]


def in_module(node: fx.Node, path: str) -> bool:
    """Whether `node` was created inside the module `path` ("" is the whole model)."""
    prefix = path + "."
    return not path or any(p == path or p.startswith(prefix) for p in module_paths(node))


def block_name(scans: list) -> str:
    """The innermost module that holds all of the block's scans (from export's nn_module_stack)."""
    common = []
    for entries in zip(*(module_paths(scan) for scan in scans)):
        if len(set(entries)) != 1:
            break
        common.append(entries[0])
    name = common[-1] if common else ""
    return name or scans[0].name


def block_output(scans: list, graph: nx.DiGraph, order: dict) -> Optional[fx.Node]:
    """Where all directions of the block have merged, followed through the gate to the projection."""
    downstream = [nx.descendants(graph, s) | {s} for s in scans]
    common = set.intersection(*downstream)
    reached = directions_reached(scans, set.union(*downstream), order)
    merged = [n for n in sorted(common, key=order.__getitem__) if isinstance(fact_of(n), Tok) and reached[n]
              and not _batch_moved(n, scans[0])]
    if not merged:
        return None
    y = merged[0]
    while len(y.users) == 1:
        user = next(iter(y.users))
        if not isinstance(fact_of(user), Tok) or user.op != "call_function":
            break
        if not (is_pointwise(user) or op_name(user) in TO_PROJECTION_OPS):
            break
        y = user
    return y


def _batch_moved(node: fx.Node, scan: fx.Node) -> bool:
    """Whether the batch is not dim 0 of `node` (directions stacked before it: torch.stack(ys).sum(0))."""
    shape, reference = shape_of(node), shape_of(scan)
    if shape is None or reference is None:
        return False
    a, b = shape[0], reference[0]
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr != b.node.expr
    return type(a) is not type(b) or a != b


def directions_reached(scans: list, nodes: set, order: dict) -> dict:
    """node -> whether every direction of every scan flows into it.

    A scan that folds G directions into one call (MultiTok output) contributes G directions. Each
    node carries, per part of its direction axis, the directions that flow into that part: a slice or
    select of the direction axis keeps some parts, so VMamba's `ys[:, 0]` (row-major and its flip
    only) is not the merged output yet, while `ys[:, 0] + unflipped(ys[:, 1])` is.
    """
    carried = {}
    for scan in scans:
        fact = fact_of(scan)
        count = len(fact.layouts) if isinstance(fact, MultiTok) else 1
        carried[scan] = tuple(frozenset({(scan, g)}) for g in range(count))
    for node in sorted(nodes - set(scans), key=order.__getitem__):
        inputs = [carried[a] for a in node.all_input_nodes if a in carried]
        carried[node] = _carry_directions(node, inputs) if inputs else ()
    wanted = {(s, g) for s in scans for g in range(len(carried[s]))}
    return {n: set().union(*carried.get(n, ())) >= wanted for n in nodes}


def _carry_directions(node: fx.Node, inputs: list) -> tuple:
    """Per output part, the directions flowing into it (see directions_reached)."""
    out, source = fact_of(node), fact_of(node.args[0]) if node.args else None
    everything = frozenset().union(*(frozenset().union(*parts) for parts in inputs))
    if isinstance(source, MultiTok) and not isinstance(out, Unknown) \
            and op_name(node) in ("aten::slice", "aten::select", "aten::flip"):
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


def _selected_parts(node: fx.Node, fact: MultiTok, parts: tuple) -> Optional[tuple]:
    """The parts of the direction axis that a slice/select keeps, or the flipped order of all."""
    shape = shape_of(node.args[0])
    ndim = len(shape)
    if op_name(node) == "aten::flip":
        dims = [norm_dim(d, ndim) for d in argument(node, "dims")]
        return parts[::-1] if fact.gdim in dims else parts
    if norm_dim(argument(node, "dim", 0), ndim) != fact.gdim or len(parts) != len(fact.layouts):
        return None
    size = shape[fact.gdim]
    if op_name(node) == "aten::select":
        return (parts[fact.part_at(argument(node, "index"), size)],)
    start = argument(node, "start", None) or 0
    end = argument(node, "end", None)
    span = fact.part_span(start, size if end is None else min(end, size), size)
    return parts[span.start:span.stop]


def mixing_of(scans: list, graph: nx.DiGraph, scope: str) -> str:
    """A short description of the token mixing recognised around the scans: the scans' orders and
    the token convolutions of the block's own module `scope` that feed them."""
    layouts = [_describe(fact_of(s)) for s in scans]
    parts = [f"{len(scans)} scan{'s' if len(scans) > 1 else ''} ({', '.join(layouts)})"]
    ancestors = set().union(*(nx.ancestors(graph, s) for s in scans))
    convs = sorted({op_name(n).split("::")[-1] for n in ancestors if op_name(n) in TOKEN_CONVS
                    and isinstance(fact_of(n), (Tok, Grid, PaddedTok)) and in_module(n, scope)})
    if convs:
        parts.append("+ " + ", ".join(convs))
    return " ".join(parts)


def _describe(fact) -> str:
    if isinstance(fact, Tok):
        return fact.layout.describe()
    if isinstance(fact, MultiTok):
        return f"{len(fact.layouts)} directions in one call: " + ", ".join(l.describe() for l in fact.layouts)
    return "?"
