"""A second formulation of `hold` (and `decay`): the DENSE graph run with the pruned tokens masked.

The pruned graph computes every block on the K kept tokens only. What it must compute can be said
without any gather, index table or rewrite rule, on the dense graph of the same model (DESIGN.md,
"Outputs, restoration and verification"): downstream of a site,
- a selective scan step at a pruned token has delta = 0: its state passes unchanged
  (exp(0 * A) = 1, Bx = delta * B * u = 0). The mask is laid out in the order of the scan
  operand's own token layout (a flip, a zig-zag, a cross-scan direction); under `decay` the kept
  steps also decay across the gap to the previous kept step of that path (the scan's `gap`). A
  scan whose operands are in different orders (PlainMamba's official mixer: u in zig-zag order,
  dt, B, C in raster order) pairs the j-th kept token of each operand's order at step j: every
  operand is first moved to u's slots that way, then masked as above;
- a conv1d along the tokens or a conv2d on the grid sees zeros at pruned neighbours (its input
  multiplied by the mask);
- a pooled readout (mean / sum / max over the tokens, a global pool) reads kept tokens only (masked_pool.py);
- scaled_dot_product_attention over the tokens attends to the kept keys only, under `is_causal` to the
  kept keys up to the query's rank among the kept queries (masked_attention.py);
- under reduction="merge-*", the parts of the stream crossing a site are read with every pruned token
  averaged into its target (masked_merge.py);
- a tensor restored to full length (the grid before a downsampling, rewrite/stage_end.py; a neck's or
  decoder's token input, the analysis' `Site.restored`; a token output, verify_pruned.py) holds the
  kept tokens, and at pruned cells what the fill defines (rewrite/restore.py, `restored`): "carry" = the
  stream crossing the site at which the cell was pruned (the sum of the stream's parts), passed through
  the per-token ops from the stream to the tensor, or under a merge ToMe's unmerge (the value of the
  kept token the cell ended in, masked_merge.py); "zeros" = 0; "nearest" = the nearest kept cell's
  value (`filled`, by brute force on the dense values). Where carry is not defined on a decoder's input
  or an output, "nearest", as the rewrite falls back to it.
The values of the masked run at kept positions are then what the pruned graph must compute there;
pooled and readout values and restored tensors wholly.

Which nodes a site's mask applies to does not use the rewrite's regions: a node is fed by site k
when it is on the way from block k to a later token mixer, or computed from such a node (the analysis'
`Site.fed`). An early feature map, or an auxiliary head reading block k's output, is therefore dense.

Where the formulation does not apply, the run goes on densely and the node (and everything it
feeds) is marked `untrusted` with the reason: a scan whose operands are in different token orders
and folded directions, attention whose keys and values are in different token orders, `decay` on
directions folded into one scan, a pooling we do not model, a fill we do not model. What runs densely on
restored tokens (a decoder, attention the token rules do not follow) runs as the model runs it, on the
restored values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analysis import GraphAnalysis, Tok, fact_of
from ..analysis.facts import is_token_fact
from ..analysis.ops import (argument, call_argument, is_scan, looks_at_neighbours, op_name, scan_signature,
                            with_argument)
from ..settings import Alignment, Fill
from .masked_attention import masked_attention
from .masked_merge import MaskedMerges
from .masked_pool import masked_pool, pools_tokens
from .masked_scan import along, path_gaps_dense, scan_operands_agree, zipped_to_u
from .masks import filled, mask_like, path_of
from ..analysis.stream_chain import ancestors_where, stream_and_chain

_ATTENTION = ("aten::scaled_dot_product_attention", "aten::matmul", "aten::bmm", "aten::baddbmm", "aten::einsum")


def fed_by_sites(analysis: GraphAnalysis, keys) -> dict:
    """{site key: the nodes it feeds}: the analysis' `Site.fed` (on the way to a later token mixer, or
    computed from such a node) that are computed from block k's output. What only reads a site's block
    output (an auxiliary head, a feature map reaching no later mixer) is not fed: the pruned graph computes
    it densely, before the site; nor is what is computed from the weights alone (a later scan's exp(A_log),
    a 1x1 conv's reshaped weight)."""
    return {key: analysis.sites[key].fed & descendants([analysis.blocks[key - 1].y])
            for key in keys if key in analysis.sites}


def descendants(starts: list) -> set:
    """Every node computed from one of `starts` (a start itself only when computed from another)."""
    seen, todo = set(), list(starts)
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _looks_at_neighbours(node: fx.Node) -> bool:
    """A conv1d along the tokens with a window wider than one token, or a conv2d that reads neighbours."""
    name = op_name(node)
    if name == "aten::conv1d":
        return argument(node, "weight").meta["val"].shape[-1] > 1
    return name == "aten::conv2d" and looks_at_neighbours(node)


def masks_tokens(node: fx.Node) -> bool:
    """Whether the masked run may mask `node`'s token inputs (`MaskedHold._masked_call` looks at no other
    node): a scan, a convolution reading neighbours, a pooling of the tokens, attention over them."""
    return is_scan(node) or _looks_at_neighbours(node) or pools_tokens(node) or op_name(node) in _ATTENTION


class MaskedHold(fx.Interpreter):
    """Run the dense graph `analysis.gm` with the tokens each site prunes masked (module docstring).

    `keep`: {site key: (B, L) bool, True at the original positions kept there}, as the pruned graph
    chose them (a site of `fed` missing from it: nodes it feeds are untrusted). After `run`, `untrusted` maps nodes whose value the formulation does not define
    (or that depend on one) to the reason, and `site_of` maps every node a site's mask applies to
    to the latest such site of its stage."""

    def __init__(self, analysis: GraphAnalysis, keep: dict, alignment: Alignment, fill: Fill,
                 fed: Optional[dict] = None, merge: Optional[tuple] = None):
        super().__init__(analysis.gm, garbage_collect_values=False)
        self.analysis, self.keep, self.alignment, self.fill = analysis, keep, alignment, fill
        self.kept_at = keep     # {site: (B, L) True at the kept ORIGINAL positions}: fills and restores read these
        # merge = (reduction, {site: (B, K) kept positions in slot order}): the stream's parts are read merged
        self.merges = MaskedMerges(analysis, merge[1], merge[0], self.original) if merge else None
        self.fed = fed if fed is not None else fed_by_sites(analysis, keep)
        keys = sorted(self.fed)     # a site in `fed` but not in `keep`: its kept positions are unknown
        self.site_of: dict = {}
        for key in keys:    # later sites win: within a stage their kept tokens are a subset
            for node in self.fed[key]:
                if node not in analysis.after_stage(key):
                    self.site_of[node] = key
        self.stage_ends: dict = {}    # restore node -> (StageEnd, [keys of the stage, in order])
        for key in keys:
            end = analysis.stage_end(key)
            if end is not None:
                self.stage_ends.setdefault(end.restore, (end, []))[1].append(key)
        # the nodes that read a stage's stream into its downsampling -> the stream (restore node)
        self._fill_readers = {reader: restore for restore, (end, _) in self.stage_ends.items()
                              for reader in end.reading_restore()}
        # a node of a restored tail (a decoder's conv) -> {token input holding pruned tokens: the last site
        # that pruned them}. Which values hold pruned tokens is the definition of a site (the analysis'
        # `Site.fed`: on the way to later token work), not something this formulation re-derives: a feature
        # map read at the site but reaching no later mixer stays dense and is read as it is.
        sites = [analysis.sites[key] for key in keys if key in analysis.sites]
        restored = set().union(*(site.restored for site in sites))
        reads = {n: {a: max(site.key for site in sites if a in site.fed) for a in n.all_input_nodes
                     if a not in restored and any(a in site.fed for site in sites)} for n in restored}
        self._restored_reads = {n: r for n, r in reads.items() if r}
        self._dense_tail = restored - set(self._restored_reads)     # run on restored values only: as the model
        self.untrusted: dict = {}
        self._filled: dict = {}       # restore node -> its value with the fill at pruned cells
        self._merged_parts = {key: set(self.merges.parts(key)) for key in keys} if self.merges else {}

    def feeds(self, node: fx.Node) -> list:
        """The sites that feed `node`."""
        return [key for key, nodes in self.fed.items() if node in nodes]

    # -- the run ---------------------------------------------------------------------------------
    def run_node(self, n: fx.Node):
        inherited = next((self.untrusted[a] for a in n.all_input_nodes if a in self.untrusted), None)
        key = self.site_of.get(n)
        reason = None
        if n in self._restored_reads:
            value, reason = self._run_restored(n)
        elif n.op != "call_function" or n in self._dense_tail or (key is None and n not in self._fill_readers):
            value = super().run_node(n)
        else:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                value, reason = self._masked_call(n, key, args, kwargs)
        if n in self.stage_ends:
            self.env[n] = value
            self._filled[n], fill_reason = self._fill(n, self.original(n))
            if fill_reason:
                self.untrusted.setdefault(self.stage_ends[n][0].downsampling, fill_reason)
        if reason or inherited or n in self.untrusted:
            self.untrusted[n] = self.untrusted.get(n) or reason or inherited
        return value

    def map_nodes_to_values(self, args, n: fx.Node):
        return fx.node.map_arg(args, lambda a: self.read(a, n))

    def read(self, a: fx.Node, n: fx.Node):
        """The value of `a` as node `n` reads it: a stage's stream read into its downsampling is the stream
        restored with the fill; a part of the stream crossing a merging site, merged."""
        merged = self.merged_read(a, n)
        if merged is not None:
            return merged
        return self._filled[a] if self._fill_readers.get(n) is a else self.env[a]

    def merged_read(self, a: fx.Node, n: fx.Node):
        """`a` merged as the site `n` runs after merges it (original positions); None where no merge applies."""
        key = self.site_of.get(n)     # what the site's kept tokens flow into (`Site.fed`); a map it only reads stays dense
        if key is None or a not in self._merged_parts.get(key, ()):
            return None
        return self.merges.merged(key, a)

    def original(self, a: fx.Node):
        """The value of `a` with its tokens at their original positions (here: as run)."""
        return self.env[a]

    def _run_restored(self, n: fx.Node) -> tuple:
        """(value, reason or None) of a decoder node run densely on its token inputs restored with the fill."""
        values = {}
        for a, key in self._restored_reads[n].items():
            if key not in self.keep:
                return super().run_node(n), f"{n.name}: the positions kept by the site after block {key} are unknown"
            values[a], reason = self.restored(a, self.original(a), self.stage_keys(key), carry_or_nearest=True)
            if values[a] is None:
                return super().run_node(n), (f"{n.name}: reads {a.name} restored with fill={self.fill}, which has no "
                                             f"masked formulation here ({reason})")
        fetch = lambda a: values[a] if a in values else self.read(a, n)      # noqa: E731
        with self._set_current_node(n):
            return n.target(*fx.node.map_arg(n.args, fetch), **fx.node.map_arg(n.kwargs, fetch)), None

    def _masked_call(self, n: fx.Node, key: Optional[int], args, kwargs) -> tuple:
        """(value, reason the formulation does not define it or None)."""
        call = lambda a=args, k=kwargs: n.target(*a, **k)        # noqa: E731
        if key is None:
            return call(), None
        if key not in self.keep:
            return call(), f"the pruned graph does not compute the positions the site after block {key} keeps"
        if not masks_tokens(n):
            return call(), None
        keep, name = self.keep[key], op_name(n)
        if is_scan(n):
            return self._scan(n, keep, args, kwargs)
        if _looks_at_neighbours(n) and not self._is_downsampling(n):
            x = args[0]
            mask = mask_like(fact_of(n.args[0]), tuple(x.shape), keep)
            if mask is None:
                return call(), f"{n.name}: a convolution whose token axis could not be masked"
            return call((x * mask,) + tuple(args[1:])), None
        if pools_tokens(n):
            return masked_pool(n, keep, args, kwargs)
        if name == "aten::scaled_dot_product_attention":
            return masked_attention(n, keep, args, kwargs)
        if name in _ATTENTION and sum(is_token_fact(fact_of(a)) for a in n.all_input_nodes) >= 2:
            return call(), f"{n.name}: attention over the tokens (no masked formulation)"
        return call(), None

    def _is_downsampling(self, n: fx.Node) -> bool:
        return any(end.downsampling is n for end, _ in self.stage_ends.values())

    def _scan(self, n: fx.Node, keep: torch.Tensor, args, kwargs) -> tuple:
        call = lambda a=args, k=kwargs: n.target(*a, **k)        # noqa: E731
        target, signature = n.target, scan_signature(n)
        delta_fact = fact_of(argument(n, signature.step))
        if not scan_operands_agree(n):
            zipped = zipped_to_u(n, keep, args, kwargs)
            if zipped is None:
                return call(), f"{n.name}: a scan whose operands are in different token orders, not all of one axis"
            args, kwargs = zipped
            delta_fact = fact_of(argument(n, signature.input))
        delta_value = call_argument(target, args, kwargs, signature.step)
        mask = mask_like(delta_fact, tuple(delta_value.shape), keep)
        if mask is None:
            return call(), f"{n.name}: the scan's step sizes could not be masked"
        bias = call_argument(target, args, kwargs, signature.step_bias)
        dt = delta_value.float()
        if bias is not None:
            dt = dt + along(bias.float(), signature.bias_axis, delta_value.dim())
        if call_argument(target, args, kwargs, signature.step_softplus, False):
            dt = F.softplus(dt)
        dt = (dt * mask).to(delta_value.dtype)
        args, kwargs = with_argument(target, tuple(args), dict(kwargs), signature.step, dt)
        args, kwargs = with_argument(target, args, kwargs, signature.step_bias, None)
        args, kwargs = with_argument(target, args, kwargs, signature.step_softplus, False)
        if self.alignment is Alignment.DECAY:
            if not isinstance(fact_of(n), Tok):
                return call(), f"{n.name}: decay across the gaps of directions folded into one scan"
            gap = path_gaps_dense(keep[:, path_of(fact_of(n).layout)])
            args, kwargs = with_argument(target, args, kwargs, "gap", gap)
        return n.target(*args, **kwargs), None

    # -- restores ----------------------------------------------------------------------------------
    def stage_keys(self, key: int) -> list:
        """The sites of `key`'s stage up to `key`, in order (the tokens a value fed by `key` lacks were
        pruned at one of them)."""
        analysis = self.analysis
        return [k for k in sorted(self.fed) if k <= key and analysis.same_stage(k, key)]

    def restored(self, node: fx.Node, value: torch.Tensor, keys: list, carry_or_nearest: bool = False) -> tuple:
        """(`value` of `node`, original positions, with the tokens the sites `keys` (one stage, in order)
        pruned restored as rewrite/restore.py defines it, None) or (None, why it is not defined here).
        "carry": each pruned token the stream crossing its site, through the per-token ops from the stream
        to `node`; under a merge, ToMe's unmerge (the value of the kept token it ended in). Where carry is
        not defined, `carry_or_nearest` (a graph output, a decoder's input) falls back to "nearest", as the
        rewrite does."""
        if any(key not in self.keep for key in keys):
            return None, f"{node.name}: the positions kept in its stage are unknown"
        fact, keep = fact_of(node), self.kept_at[keys[-1]]
        if mask_like(fact, tuple(value.shape), keep) is None:
            return None, f"{node.name}: its token axis could not be masked"
        fill = self.fill
        if fill is Fill.CARRY and self.merges is not None:
            return self.merges.unmerged(keys, fact, value), None
        if fill is Fill.CARRY:
            carried, reason = self._carry(node, value, keys)
            if carried is not None or not carry_or_nearest:
                return carried, reason
            fill = Fill.NEAREST
        value_filled = filled(fact, value, keep, fill)
        return (value_filled, None) if value_filled is not None else (
            None, f"{node.name}: fill={fill} could not be laid on its tokens")

    def _fill(self, restore: fx.Node, value: torch.Tensor) -> tuple:
        """(the restored stream with the fill at pruned cells, reason it is not defined or None)."""
        end, keys = self.stage_ends[restore]
        restored, reason = self.restored(restore, value, keys)
        if restored is None:
            return value, f"{reason} (the stream restored before {end.downsampling.name})"
        return restored, None

    def _carry(self, restore: fx.Node, value: torch.Tensor, keys: list) -> tuple:
        """(`value` with every cell pruned at a site of `keys` carried, None) or (None, why carry is not
        defined for `restore`)."""
        masks = [mask_like(fact_of(restore), tuple(value.shape), self.kept_at[key]) for key in keys]
        if any(m is None for m in masks):
            return None, f"{restore.name}: its tokens could not be masked at every site of its stage"
        if restore in self.stage_ends:      # a stage's stream before its downsampling: the stream itself
            carried = self._carried(restore, value, keys, masks)
            if carried is not None:
                return carried, None
        pruned = ancestors_where(restore, lambda n: n in self.site_of)     # those a site's mask applies to
        source = stream_and_chain(restore, pruned, lambda n: self.analysis.is_stream_sum(n, keys))
        if source is None:
            return None, (f"{restore.name}: no stream like it crosses a site of its stage, nor one it is computed "
                          "from token by token (fill='carry')")
        stream, chain = source                          # re-run on the carried stream, as the rewrite does
        masks = [mask_like(fact_of(stream), tuple(self.env[stream].shape), self.kept_at[key]) for key in keys]
        if any(m is None for m in masks):
            return None, f"{restore.name}: the stream {stream.name} it is computed from could not be masked"
        values = {stream: self._carried(stream, self.original(stream), keys, masks)}
        fetch = lambda a: values[a] if a in values else self.original(a)      # noqa: E731
        for node in chain:
            values[node] = node.target(*fx.node.map_arg(node.args, fetch), **fx.node.map_arg(node.kwargs, fetch))
        return values[chain[-1] if chain else stream], None

    def _carried(self, node: fx.Node, value: torch.Tensor, keys: list, masks: list) -> Optional[torch.Tensor]:
        """`value` (of `node`) with every cell pruned at a site of `keys` holding the stream's value at that
        site; None when no stream like `node` crosses one of them."""
        streams = [self._stream(node, key) for key in keys]
        if any(s is None for s in streams):
            return None
        carried = streams[0]
        for before, stream in zip(masks, streams[1:]):    # a cell pruned at a later site carries that site's stream
            carried = torch.where(before, stream, carried)
        return torch.where(masks[-1], value, carried)

    def _stream(self, restore: fx.Node, key: int) -> Optional[torch.Tensor]:
        """The masked run's stream at site `key`: the sum of the tensors like `restore` crossing it."""
        parts = [self.original(n) for n in self.analysis.stream_parts_like(restore, key)]
        return sum(parts[1:], parts[0]) if parts else None

