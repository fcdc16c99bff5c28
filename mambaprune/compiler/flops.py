"""FLOPs of vision SSM models, dense and under a token schedule.

Convention (DESIGN.md): multiply-accumulates (MACs) reported as "FLOPs", as ViM / PlainMamba /
fvcore do. Linear and conv layers: MACs (bias adds not counted; a depthwise causal conv1d padded by
d_conv - 1 is counted on the L + d_conv - 1 outputs it computes before the slice). Selective scan:
9 * B * L * D * N, + B*D*L with D, + B*D*L with z (the formula registered by
``mambaprune.runtime`` for ``torch.ops.mambaprune.selective_scan``). Norms, activations, adds,
gathers are not counted.

Counting is torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs per MAC: every count it
returns is halved here. Models may live on the meta device (shapes only, nothing is computed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

SCAN_OP_NAME = "selective_scan"

__all__ = ["FlopsReport", "count_flops", "find_ssm_blocks", "flops_under_schedule", "schedule_tokens"]


@dataclass
class FlopsReport:
    """FLOPs (MACs) of one forward pass over ``batch_size`` inputs.

    total: whole model. per_module: every module by qualified name ("" is the root) -> MACs.
    by_op: op name (e.g. "aten.mm", "mambaprune.selective_scan") -> MACs for the whole model.
    blocks_path: qualified name of the ModuleList of SSM blocks ("" if none found).
    per_block: MACs of each block of that list. block_tokens: tokens entering each block.
    per_block_scan: the selective-scan part of per_block.
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
        return float(sum(v for k, v in self.by_op.items() if SCAN_OP_NAME in k))

    @property
    def linear_conv(self) -> float:
        """Everything but the scan (linear, conv and any other counted op)."""
        return self.total - self.scan

    def __str__(self) -> str:
        g = lambda v: f"{v / 1e9:10.4f}"  # noqa: E731
        per = f" (per image: {self.total / self.batch_size / 1e9:.4f} G)" if self.batch_size > 1 else ""
        lines = [f"FLOPs (MACs), batch {self.batch_size}: total {self.total / 1e9:.4f} G{per}",
                 f"{'part':<40}{'GMACs':>10}{'%':>8}"]
        pct = lambda v: f"{100 * v / self.total:8.2f}" if self.total else f"{0:8.2f}"  # noqa: E731
        for name, value in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            lines.append(f"{'op ' + name:<40}{g(value)}{pct(value)}")
        lines.append(f"{'non-block (embed, head, ...)':<40}{g(self.non_block)}{pct(self.non_block)}")
        for i, (value, tokens) in enumerate(zip(self.per_block, self.block_tokens or [None] * len(self.per_block))):
            label = f"{self.blocks_path}.{i}" + (f" (L={tokens})" if tokens is not None else "")
            lines.append(f"{label:<40}{g(value)}{pct(value)}")
        return "\n".join(lines)


def _as_tuple(example_inputs) -> Tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _default_inputs(model: nn.Module, batch: int = 1) -> Tuple[torch.Tensor]:
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError("example_inputs is required: the model exposes no img_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    param = next(model.parameters())
    in_chans = 3
    return (torch.zeros(batch, in_chans, *size, device=param.device, dtype=param.dtype),)


def _module_names(model: nn.Module) -> Dict[str, str]:
    """FlopCounterMode's module names ("Cls.a.b") -> qualified names ("a.b")."""
    root = type(model).__name__
    return {(root if not name else f"{root}.{name}"): name for name, _ in model.named_modules()}


def _count(model: nn.Module, inputs: Tuple) -> Tuple[Dict[str, Dict[str, float]], Dict[str, List[int]]]:
    """Per-module by-op MACs and, per module, the token count (dim 1 of the first tensor input)."""
    tokens: Dict[str, List[int]] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(mod, args, name=name):
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                tokens.setdefault(name, []).append(int(args[0].shape[1]))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    names = _module_names(model)
    out: Dict[str, Dict[str, float]] = {}
    for key, ops in counter.get_flop_counts().items():
        qual = "<global>" if key == "Global" else names.get(key, key)
        out[qual] = {str(op): count / 2 for op, count in ops.items()}
    return out, tokens


def _find_blocks(model: nn.Module, counts: Mapping[str, Mapping[str, float]]) -> str:
    """Qualified name of the largest nn.ModuleList whose modules call the selective scan."""
    best, best_n = "", 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        calling = sum(
            1 for i in range(len(module))
            if any(SCAN_OP_NAME in op for op in counts.get(f"{name}.{i}" if name else str(i), {}))
        )
        if calling > best_n:
            best, best_n = name, calling
    return best


def find_ssm_blocks(model: nn.Module, example_inputs=None) -> Tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's SSM blocks, found by counting one forward."""
    inputs = _as_tuple(example_inputs) if example_inputs is not None else _default_inputs(model)
    counts, _ = _count(model, inputs)
    name = _find_blocks(model, counts)
    if not name:
        raise ValueError("no nn.ModuleList of modules calling selective_scan found")
    return name, model.get_submodule(name)


def count_flops(model: nn.Module, example_inputs=None) -> FlopsReport:
    """Dense FLOPs (MACs) of ``model(*example_inputs)``: total, per module, per op, per SSM block.

    The batch size is the inputs' (default: batch 1 at ``model.img_size``, i.e. per image).
    """
    inputs = _as_tuple(example_inputs) if example_inputs is not None else _default_inputs(model)
    counts, tokens = _count(model, inputs)
    glob = counts.pop("<global>", {})
    total = float(sum(glob.values()))
    per_module = {name: float(sum(ops.values())) for name, ops in counts.items()}
    blocks_path = _find_blocks(model, counts)
    per_block: List[float] = []
    block_tokens: List[int] = []
    per_block_scan: List[float] = []
    if blocks_path:
        blocks = model.get_submodule(blocks_path)
        for i in range(len(blocks)):
            q = f"{blocks_path}.{i}"
            per_block.append(per_module.get(q, 0.0))
            block_tokens.append(tokens.get(q, [0])[0])
            per_block_scan.append(float(sum(v for k, v in counts.get(q, {}).items() if SCAN_OP_NAME in k)))
    batch = int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) else 1
    return FlopsReport(total=total, per_module=per_module, by_op=dict(glob), batch_size=batch,
                       blocks_path=blocks_path, per_block=per_block, block_tokens=block_tokens,
                       per_block_scan=per_block_scan)


def flops_under_schedule(model: nn.Module, tokens_per_block: Sequence[int], example_inputs=None,
                         report: Optional[FlopsReport] = None, include_scan: bool = True) -> float:
    """FLOPs (MACs) of the model when block i sees ``tokens_per_block[i]`` tokens instead of its dense L.

    No compiler involved: every block's dense FLOPs are counted once and scaled by tokens_i / L_i;
    non-block FLOPs (patch embed, head, ...) are not scaled. The scaling is exact for token-wise
    layers (linear projections, norms), the selective scan (linear in L) and the causal conv1d up to
    its d_conv - 1 padded outputs (counted once per channel, independent of L; they are scaled too).
    A dense depthwise conv2d on the H x W grid scales the same way under the paper's convention
    (its cost is per output token). Default inputs: batch 1 at model.img_size, i.e. per image.
    ``report``: a ``count_flops`` result to reuse. ``include_scan=False`` leaves the scan out
    everywhere (the "linear + conv only" convention).
    """
    rep = report if report is not None else count_flops(model, example_inputs)
    if not rep.per_block:
        raise ValueError("model has no SSM blocks (no ModuleList of modules calling selective_scan)")
    if len(tokens_per_block) != len(rep.per_block):
        raise ValueError(f"tokens_per_block has {len(tokens_per_block)} entries, model has {len(rep.per_block)} blocks")
    blocks = rep.per_block if include_scan else [f - s for f, s in zip(rep.per_block, rep.per_block_scan)]
    non_block = rep.non_block if include_scan else rep.non_block - (rep.scan - sum(rep.per_block_scan))
    scaled = sum(f * (t / L) for f, t, L in zip(blocks, tokens_per_block, rep.block_tokens))
    return float(non_block + scaled)


def schedule_tokens(num_tokens: int, depth: int, schedule: Mapping[int, float], num_protected: int = 0) -> List[int]:
    """Tokens per block under a pruning schedule.

    ``schedule[k] = keep_rate``: a pruning site after the first k blocks (before block index k,
    0-based) keeps ``num_protected + round(keep_rate * (current - num_protected))`` tokens
    (protected tokens, e.g. class tokens, are never pruned).
    """
    for k, rate in schedule.items():
        if not 0 <= k < depth:
            raise ValueError(f"site {k} outside 0..{depth - 1}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"keep rate {rate} outside [0, 1]")
    tokens, current = [], int(num_tokens)
    for i in range(depth):
        if i in schedule:
            current = num_protected + int(round(schedule[i] * (current - num_protected)))
        tokens.append(current)
    return tokens
