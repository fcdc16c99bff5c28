"""The report a PrunedModel carries: what was found, what was pruned, what it costs."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockReport:
    index: int
    name: str
    mixing: str
    tokens: int


@dataclass
class RecoveryRecord:
    """What `mambaprune.recover` trained: label-free distillation from the dense teacher."""

    steps: int
    seconds: float                 # wall time of the training loop
    losses: list                   # the distillation loss at every step (the global batch's mean)
    lr: float                      # peak learning rate (AdamW, linear warm-up then cosine to 0)
    temperature: float
    batch_size: int                # global batch (all ranks together)
    seed: int
    world_size: int = 1            # processes that trained it together (torch.distributed)
    augment: str = "none"          # what each batch went through first (api/augment.py)
    dense_loss: str = "auto"       # how outputs with more than 2 dims were distilled (api/distill.py)
    features: tuple = ()           # teacher submodules whose inputs were matched too
    feature_weight: float = 0.0

    def __str__(self) -> str:
        first, last = (self.losses[0], self.losses[-1]) if self.losses else (float("nan"),) * 2
        ranks = f" on {self.world_size} processes" if self.world_size > 1 else ""
        aug = f", augment {self.augment}" if self.augment != "none" else ""
        aug += {"kl": ", per-pixel KL", "channel": ", channel-wise KL", "mse": ", dense outputs by relative squared error"
                }.get(self.dense_loss, "")
        aug += f", features of {', '.join(self.features)} x {self.feature_weight:g}" if self.features else ""
        return (f"recovered: {self.steps} steps of label-free distillation from the dense model (KL at temperature "
                f"{self.temperature:g}, AdamW lr {self.lr:g} cosine, batch {self.batch_size}, seed {self.seed}{aug}){ranks} "
                f"in {self.seconds:.1f} s; loss {first:.4g} -> {last:.4g}")


@dataclass
class PruneReport:
    blocks: list
    sites: dict                    # site key (after that many blocks) -> kept tokens K
    keep_rates: dict
    token_length: int
    protected: list
    dense_flops: float             # MACs per image, measured on the dense graph
    pruned_flops: float            # MACs per image, measured on the pruned graph
    estimated_flops: float         # what the plan predicted
    target_ratio: float
    alignment: str
    metric: str
    backend: str
    not_understood: list = field(default_factory=list)   # (module, reason)
    unprunable_sites: dict = field(default_factory=dict)
    routed_scans: list = field(default_factory=list)
    recognised_scans: list = field(default_factory=list)  # callables probed as scans: what was found and why
    plain_subclasses: list = field(default_factory=list)  # Tensor subclasses read as plain tensors at capture
    schedule_search: tuple | None = None  # schedule="auto": (chosen, {candidate: calibration discrepancy})
    site_lengths: dict = field(default_factory=dict)  # site key -> tokens of its stage (hierarchical models)
    alignment_search: tuple | None = None  # alignment="auto": (chosen, {candidate: calibration discrepancy})
    static_batch: int | None = None  # captured with this batch fixed (the model's code specialises it)
    recovery: RecoveryRecord | None = None  # set by mambaprune.recover: the training after pruning
    schedule: object = None  # the schedule asked for ("top" and {k: keep} set the keep rates: ratio unused)
    frozen_arguments: dict = field(default_factory=dict)  # non-tensor forward arguments compiled in as constants
    restorations: list = field(default_factory=list)  # rewrite.restore.Restoration: outputs / stage ends restored
    fill: str = "carry"            # what pruned positions hold where tokens are restored
    reduction: str = "drop"        # what happens to pruned tokens (drop, merge-nearest, merge-similar)
    verified: object = None        # rewrite.verify_pruned.PrunedRunCheck: what the pruned-run check compared

    @property
    def uses_ratio(self) -> bool:
        """False when the schedule sets the keep rates itself ("top", {k: keep}): the ratio was not used."""
        return self.schedule is None or self.schedule in ("paper", "uniform", "auto")

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.pruned_flops / self.dense_flops if self.dense_flops else 0.0

    def __str__(self) -> str:
        lines = [f"mambaprune report: {len(self.blocks)} SSM blocks, {self.token_length} tokens, "
                 f"alignment={self.alignment}, metric={getattr(self.metric, '__name__', self.metric)}, backend={self.backend}"
                 + (f", reduction={self.reduction}" if self.reduction != "drop" else "")]
        lines.append(f"{'block':>5}  {'module':<28} {'tokens':>6}  token mixing")
        for b in self.blocks:
            mark = "  <- pruned before this block" if b.index in self.sites else ""
            lines.append(f"{b.index:>5}  {b.name[:28]:<28} {b.tokens:>6}  {b.mixing}{mark}")
        if self.sites:
            sites = ", ".join(f"before block {k}: keep {self.sites[k]} (rate {self.keep_rates[k]:.3f})"
                              for k in sorted(self.sites))
            lines.append(f"sites: {sites}; never pruned: positions {self.protected}")
        else:
            lines.append("sites: none (ratio 0: the model is unchanged)")
        planned = 1 - self.estimated_flops / self.dense_flops if self.dense_flops else 0.0
        # reduction: measured on the pruned graph; planned: the plan's estimate
        target = (f"target {self.target_ratio:.3f}" if self.uses_ratio else
                  f"schedule {self.schedule!r} sets the keep rates: ratio {self.target_ratio} unused")
        lines.append(f"FLOPs per image (MACs): dense {self.dense_flops / 1e9:.4f} G, pruned "
                     f"{self.pruned_flops / 1e9:.4f} G, reduction {self.achieved_ratio:.3f} ({target}, planned {planned:.3f})")
        for option, search in (("alignment", self.alignment_search), ("schedule", self.schedule_search)):
            if search is not None:
                chosen, scores = search
                scored = ", ".join(f"{name} {value:.4g}" for name, value in sorted(scores.items(), key=lambda kv: kv[1]))
                lines.append(f"{option}='auto' chose {chosen} (calibration output discrepancy: {scored})")
        if self.restorations:
            restored = "; ".join(str(r) for r in self.restorations)
            lines.append(f"token outputs restored to full length (fill={self.fill}): {restored}; outputs not listed "
                         "are computed by the model's own dense ops")
        if self.verified is not None:
            lines.append(_verified_line(self.verified))
        if self.static_batch is not None:
            lines.append(f"captured with the batch fixed at {self.static_batch} (torch.export: the model's code makes the "
                         f"batch a constant): the pruned model accepts only batches of {self.static_batch}")
        if self.frozen_arguments:
            frozen = ", ".join(f"{name}={value!r}" for name, value in self.frozen_arguments.items())
            lines.append(f"arguments frozen at their compiled values (other values are refused): {frozen}")
        if self.routed_scans:
            lines.append("scans routed to mambaprune::selective_scan: " + _count_origins(self.routed_scans))
        lines.extend(self.recognised_scans)
        lines.extend(f"captured with {entry}" for entry in self.plain_subclasses)
        for module, reason in self.not_understood:
            lines.append(f"not understood: {module}: {reason}")
        if self.recovery is not None:
            lines.append(str(self.recovery))
        return "\n".join(lines)


def _verified_line(check) -> str:
    """One line: how many outputs the pruned-run check compared with what, and which it could not."""
    kinds: dict = {}
    for output in check.outputs:
        if output.compared_with:
            kinds[output.compared_with] = kinds.get(output.compared_with, 0) + 1
    compared = ", ".join(f"{n} with the {'dense model' if kind == 'dense' else 'masked dense run'}"
                         for kind, n in kinds.items()) or "none"
    line = f"verified on the example inputs with the pruned run: outputs compared: {compared}"
    if check.unchecked:
        line += "; not compared: " + "; ".join(f"output {o.index} ({o.skipped})" for o in check.unchecked)
    return line


def _count_origins(routed: list) -> str:
    """'a.scan (origin)' entries -> 'origin x count' in first-seen order."""
    counts: dict = {}
    for entry in routed:
        origin = entry[entry.rfind("(") + 1:-1] if entry.endswith(")") else entry
        counts[origin] = counts.get(origin, 0) + 1
    return ", ".join(f"{origin} x{n}" for origin, n in counts.items())
