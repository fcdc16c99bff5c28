"""The pieces of `recover`'s training: the distillation loss, the learning-rate schedule, the optimiser.

The loss is Hinton's: KL(teacher || student) of the logits softened at a temperature T, times T^2 (so
the gradients keep their size whatever T), summed over a rank's samples and divided by the GLOBAL
batch: the mean over the global batch once DistributedDataParallel has averaged the ranks' gradients
(``world`` ranks: each rank's sum is scaled by ``world`` first, DDP divides by it).

Models with dense outputs (a tuple / list / dict of feature maps, per-pixel logits) are distilled on
every floating output: a (batch, classes) output by the KL above, an output with more dims (feature
maps, per-pixel logits) by its mean squared error relative to the teacher output's mean square
(logit and feature matching: Ba & Caruana 2014, FitNets 2015), per sample, summed over outputs; with
``dense="kl"`` an output with more dims is read as per-position logits over dim 1 (segmentation: (B, classes,
H, W)) and distilled by the KL above at every position, averaged over the positions (`pixel_distillation_loss`);
with ``dense="channel"`` every channel's map is softened over its positions instead (softmax over H * W at T) and
distilled by the KL, averaged over the channels (channel-wise distillation, Shu et al., ICCV 2021:
`channel_distillation_loss`). ``"auto"`` (the default): a lone output with more than 2 dims (per-pixel
logits) by "channel", feature maps in a tuple / list / dict by "mse".

Feature matching (`feature_matching_loss`) adds the same relative squared error on intermediate tensors the
student and the teacher both compute (the feature maps a decoder reads: api/recover_features.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from ..errors import InvalidArgumentError, InvalidArgumentTypeError

WARMUP_FRACTION = 0.05   # of the steps, linear from 0 to the peak learning rate
WEIGHT_DECAY = 0.0       # the pruned model starts from trained weights: nothing to decay towards
DENSE_LOSSES = ("auto", "mse", "kl", "channel")   # how an output with more than 2 dims is distilled


def outputs_of(output):
    """A model's output as distillation reads it: a tensor of logits, or a tuple / list / dict of tensors."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list, dict)) and any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(output)):
        return output
    raise InvalidArgumentTypeError(f"recover needs models that return tensors (logits, or a tuple / list / dict of "
                                   f"them); got {type(output).__name__}")


def check_dense_loss(dense: str) -> str:
    if dense not in DENSE_LOSSES:
        raise InvalidArgumentError(f"recover: dense_loss must be one of {', '.join(map(repr, DENSE_LOSSES))}; got {dense!r}")
    return dense


def output_distillation_loss(student, teacher, temperature: float, global_batch: int, world: int = 1,
                             dense: str = "auto") -> torch.Tensor:
    """The distillation loss of a model's whole output: one tensor of logits (batch, classes) ->
    `distillation_loss`; a tuple, list or dict -> the sum over its floating leaves with a batch dim (2-D:
    KL; more dims: as ``dense`` says: "mse" `matching_loss`, "kl" `pixel_distillation_loss`, "channel"
    `channel_distillation_loss`, "auto" "channel" for a lone tensor and "mse" in a tuple / list / dict)."""
    check_dense_loss(dense)
    if dense == "auto":
        dense = "channel" if isinstance(student, torch.Tensor) else "mse"
    pairs = [(s, t) for s, t in zip(pytree.tree_leaves(student), pytree.tree_leaves(teacher))
             if isinstance(s, torch.Tensor) and s.is_floating_point() and s.dim() >= 2]
    if not pairs:
        raise InvalidArgumentTypeError("recover needs a model output with floating tensors of shape (batch, ...) to "
                                       f"distil; got {type(student).__name__}")

    def one(s, t):
        if s.dim() == 2:
            return distillation_loss(s, t, temperature, global_batch, world)
        if dense == "kl":
            return pixel_distillation_loss(s, t, temperature, global_batch, world)
        if dense == "channel":
            return channel_distillation_loss(s, t, temperature, global_batch, world)
        return matching_loss(s, t, global_batch, world)
    return sum(one(s, t) for s, t in pairs)


def pixel_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, global_batch: int,
                            world: int = 1) -> torch.Tensor:
    """Per-position logits over dim 1 (B, classes, *positions): sum over samples of the mean over positions of
    T^2 KL(softmax(teacher / T) || softmax(student / T)) over the classes, / global_batch * world."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                  log_target=True, reduction="sum")
    positions = student[0, 0].numel()
    return kl * (t * t * world / (global_batch * positions))


def channel_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, global_batch: int,
                              world: int = 1) -> torch.Tensor:
    """(B, C, *positions): sum over samples of the mean over channels of T^2 KL(softmax over the positions of
    teacher / T || the same of student / T), / global_batch * world."""
    t = float(temperature)
    s, te = student.float().flatten(2), teacher.float().flatten(2)
    kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(te / t, -1), log_target=True, reduction="sum")
    return kl * (t * t * world / (global_batch * student.shape[1]))


def feature_matching_loss(student: list, teacher: list, global_batch: int, world: int = 1) -> torch.Tensor:
    """The sum over paired feature tensors of `matching_loss` (each relative to the teacher's mean square)."""
    return sum(matching_loss(s, t, global_batch, world) for s, t in zip(student, teacher))


def matching_loss(student: torch.Tensor, teacher: torch.Tensor, global_batch: int, world: int = 1) -> torch.Tensor:
    """Sum over samples of mean((student - teacher)^2) / mean(teacher^2), / global_batch * world."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    per_sample = (s - t).pow(2).mean(1) / t.pow(2).mean(1).clamp_min(1e-12)
    return per_sample.sum() * (world / global_batch)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, global_batch: int,
                      world: int = 1) -> torch.Tensor:
    """Sum over these samples of T^2 KL(softmax(teacher / T) || softmax(student / T)), / global_batch * world."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                  log_target=True, reduction="sum")
    return kl * (t * t * world / global_batch)


def lr_factor(step: int, steps: int) -> float:
    """The learning rate at ``step`` (0-based) of ``steps``, as a fraction of the peak: warm-up, then cosine to 0."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def optimiser(parameters, lr: float, steps: int):
    """AdamW at ``lr`` with `lr_factor`'s schedule (the scheduler steps once per optimiser step)."""
    adam = torch.optim.AdamW(parameters, lr=lr, weight_decay=WEIGHT_DECAY)
    return adam, torch.optim.lr_scheduler.LambdaLR(adam, lambda step: lr_factor(step, steps))
