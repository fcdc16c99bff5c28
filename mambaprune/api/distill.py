"""The pieces of `recover`'s training: the distillation loss, the learning-rate schedule, the optimiser.

The loss is Hinton's: KL(teacher || student) of the logits softened at a temperature T, times T^2 (so
the gradients keep their size whatever T), summed over a rank's samples and divided by the GLOBAL
batch: the mean over the global batch once DistributedDataParallel has averaged the ranks' gradients
(``world`` ranks: each rank's sum is scaled by ``world`` first, DDP divides by it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentTypeError

WARMUP_FRACTION = 0.05   # of the steps, linear from 0 to the peak learning rate
WEIGHT_DECAY = 0.0       # the pruned model starts from trained weights: nothing to decay towards


def logits_of(output) -> torch.Tensor:
    """A model's output -> its logits (the first tensor of a tuple / list output)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise InvalidArgumentTypeError(f"recover needs models that return logits (a tensor); got {type(output).__name__}")
    return output


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
