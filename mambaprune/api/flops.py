"""FLOPs of a model, dense and under a schedule, from the compiler's own FLOPs model.

Convention (DESIGN.md): multiply-accumulates (MACs) reported as "FLOPs", as ViM / PlainMamba /
fvcore do. Every node of the captured graph carries the MACs torch.utils.flop_counter counts for
it with our ops' formulas (planning/flops.py: linear and conv layers as MACs, the selective scan
as 9*B*L*D*N + B*D*L with D + B*D*L with z; norms, activations, adds and gathers are free). This
module sums those per module (from export's nn_module_stack), per op and per SSM block; the FLOPs
under a schedule are the planner's estimate (planning/plan.py), the one `compile_pruned` uses.
Models may live on the meta device (shapes only, nothing is computed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.fx as fx

from ..analysis.blocks import module_paths
from ..capture import as_tuple
from ..analysis.ops import is_scan, op_name
from ..meta_keys import FLOPS
from ..planning import make_plan
from ..planning.plan import estimate
from .compile import Prepared, prepare

SCAN_OP_NAMES = ("selective_scan", "ssd_scan")

__all__ = ["FlopsReport", "count_flops", "flops_under_schedule"]


@dataclass
class FlopsReport:
    """FLOPs (MACs) of one forward pass over ``batch_size`` inputs.

    total: whole model. per_module: every module by qualified name ("" is the root) -> MACs.
    by_op: op name (e.g. "aten.mm", "mambaprune.selective_scan") -> MACs for the whole model.
    blocks_path: qualified name of the container of the SSM blocks ("" if the blocks are not
    items of one container). per_block: MACs of each SSM block (its repeated module, or the module
    holding its scans). block_tokens: tokens entering each block. per_block_scan: the
    selective-scan part of per_block.
    """

    total: float
    per_module: Dict[str, float]
    by_op: Dict[str, float]
    batch_size: int
    blocks_path: str = ""
    per_block: List[float] = field(default_factory=list)
    block_tokens: List[int] = field(default_factory=list)
    per_block_scan: List[float] = field(default_factory=list)

    @property
    def blocks_total(self) -> float:
        return float(sum(self.per_block))

    @property
    def non_block(self) -> float:
        return self.total - self.blocks_total

    @property
    def scan(self) -> float:
        return float(sum(v for k, v in self.by_op.items() if any(name in k for name in SCAN_OP_NAMES)))

    @property
    def linear_conv(self) -> float:
        """Everything but the scan (linear, conv and any other counted op)."""
        return self.total - self.scan

    def __str__(self) -> str:
        g = lambda v: f"{v / 1e9:10.4f}"  # noqa: E731
        pct = lambda v: f"{100 * v / self.total:8.2f}" if self.total else f"{0:8.2f}"  # noqa: E731
        per = f" (per image: {self.total / self.batch_size / 1e9:.4f} G)" if self.batch_size > 1 else ""
        lines = [f"FLOPs (MACs), batch {self.batch_size}: total {self.total / 1e9:.4f} G{per}",
                 f"{'part':<40}{'GMACs':>10}{'%':>8}"]
        for name, value in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            lines.append(f"{'op ' + name:<40}{g(value)}{pct(value)}")
        lines.append(f"{'non-block (embed, head, ...)':<40}{g(self.non_block)}{pct(self.non_block)}")
        for i, (value, tokens) in enumerate(zip(self.per_block, self.block_tokens)):
            label = f"{self.blocks_path}.{i}" if self.blocks_path else f"block {i}"
            lines.append(f"{label + f' (L={tokens})':<40}{g(value)}{pct(value)}")
        return "\n".join(lines)


def count_flops(model: torch.nn.Module, example_inputs=None) -> FlopsReport:
    """Dense FLOPs (MACs) of ``model(*example_inputs)``: total, per module, per op, per SSM block.

    The batch size is the inputs' (default: batch 1 at the size the model declares, i.e. per image);
    every counted op's MACs are linear in the batch, so the per-image counts are scaled by it.
    """
    prepared = _prepared(model, example_inputs)
    batch = next((x.shape[0] for x in prepared.example_inputs if isinstance(x, torch.Tensor) and x.dim()), 1)
    return flops_report(prepared, int(batch))


def flops_under_schedule(model: torch.nn.Module, schedule, example_inputs=None, include_scan: bool = True,
                         prepared: Prepared = None) -> float:
    """FLOPs (MACs) per image of ``model`` pruned with ``schedule`` ({k: keep_rate}, "top", ...),
    as `compile_pruned`'s planner estimates them (its report measures the same on the pruned graph).
    ``include_scan=False`` leaves the selective scans out (the "linear + conv only" convention);
    ``prepared``: a `prepare(model)` result to reuse."""
    prepared = prepared or _prepared(model, example_inputs)
    plan = make_plan(prepared.analysis, prepared.flops, 0.0, schedule)
    if include_scan:
        return plan.estimated_flops
    flops = {node: f for node, f in prepared.flops.items() if not is_scan(node)}
    return estimate(prepared.analysis, flops, plan.kept)


def _prepared(model, example_inputs) -> Prepared:
    return prepare(model, None if example_inputs is None else as_tuple(example_inputs))


def flops_report(prepared: Prepared, batch: int = 1) -> FlopsReport:
    """The FLOPs of a prepared model (per image) for a batch of `batch`."""
    gm, analysis = prepared.captured.gm, prepared.analysis
    per_module: Dict[str, float] = {}
    by_op: Dict[str, float] = {}
    for node in gm.graph.nodes:
        macs = node.meta.get(FLOPS, 0.0) * batch
        if not macs:
            continue
        for path in set([""] + module_paths(node)):
            per_module[path] = per_module.get(path, 0.0) + macs
        by_op[_op_key(node)] = by_op.get(_op_key(node), 0.0) + macs
    scopes = [b.container or b.name for b in analysis.blocks]
    per_block = [per_module.get(scope, 0.0) for scope in scopes]
    per_block_scan = [batch * sum(n.meta.get(FLOPS, 0.0) for n in b.scans) for b in analysis.blocks]
    return FlopsReport(total=float(sum(by_op.values())), per_module=per_module, by_op=by_op, batch_size=batch,
                       blocks_path=_common_container(scopes), per_block=per_block,
                       block_tokens=[b.token_length for b in analysis.blocks], per_block_scan=per_block_scan)


def _op_key(node: fx.Node) -> str:
    """'aten::mm' -> 'aten.mm', as FlopCounterMode names ops."""
    return op_name(node).replace("::", ".")


def _common_container(scopes: List[str]) -> str:
    """'layers' when every block is an item 'layers.<i>' of one container, else ''."""
    parents = {scope.rpartition(".")[0] for scope in scopes}
    ok = len(parents) == 1 and all(scope.rpartition(".")[2].isdigit() for scope in scopes)
    return parents.pop() if ok else ""


def find_ssm_blocks(model: torch.nn.Module, example_inputs=None) -> tuple:
    """(qualified name, module) of the container of the model's SSM blocks."""
    report = count_flops(model, example_inputs)
    if not report.blocks_path:
        raise ValueError("the model's SSM blocks are not the items of one container")
    return report.blocks_path, model.get_submodule(report.blocks_path)

