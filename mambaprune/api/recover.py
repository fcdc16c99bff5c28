"""`recover`: win back what pruning loses by label-free distillation from the dense model.

A copy of the pruned model's graph is trained (AdamW, warm-up then cosine) to match the dense teacher's
logits softened at a temperature, on unlabelled images: no labels, minutes on a CPU for small models. Dense
outputs (feature maps, per-pixel logits) are matched by relative squared error or a per-pixel KL
(``dense_loss``), and the tensors a named submodule reads (a decoder's restored feature maps) can be matched
too (``features``: api/recover_features.py).
The teacher and the pruned model passed in are never modified. Under torch.distributed (torchrun),
the copy is wrapped in DistributedDataParallel and every rank trains on its own shard of every global
batch, so N processes see the same samples in the same order as one would (api/distributed.py).
"""
from __future__ import annotations

import copy
import dataclasses
import numbers
import time
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from tqdm import tqdm

from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from . import distributed
from .augment import augment_batch, check_augment
from .distill import (
    check_dense_loss, feature_matching_loss, optimiser, output_distillation_loss, outputs_of)
from .pruned_model import PrunedModel
from .recover_data import global_batches, shard
from .recover_features import TeacherFeatures, check_features, feature_tensors, with_features
from .report import RecoveryRecord

# defaults from benchmarks/results/recovery_digits.md (README, "Recover"): on the digits ViM at -30%, lr 3e-4
# beat 1e-3 at 100 and 300 steps; temperature 2 beat 1 on agreement and KL at 300 steps; augment "mixup+shift"
# beat "none" on top-1 after 300 steps in every pair measured: ViM -30% 0.956 / 0.950 against 0.946 / 0.942
# (seeds 0 / 1), ViM -50% 0.912 against 0.908, PlainMamba -30% 0.974 against 0.968 (T 1)
DEFAULT_STEPS = 300
DEFAULT_LR = 3e-4
DEFAULT_BATCH_SIZE = 32
DEFAULT_TEMPERATURE = 2.0
DEFAULT_AUGMENT = "mixup+shift"
# README, "Segmentation": at -30%, 300 steps, seed 0, the channel-wise KL ("auto" on a lone per-pixel output)
# recovered PlainMamba to 58.00 mIoU against 52.77 per-pixel KL, ViM to 46.54 against 45.22 (KL) and 41.87 (mse)
DEFAULT_DENSE_LOSS = "auto"
# README, "Segmentation": per-pixel logits distilled channel-wise recover further at a higher lr: at -30%,
# 300 steps, ViM 46.54 (lr 3e-4) -> 48.49 (1e-3) -> 45.21 (3e-3) mIoU, PlainMamba 58.00 -> 62.14 (seed 0);
# seed 1: ViM 46.99 -> 48.34, PlainMamba 57.91 -> 62.17
DENSE_LR = 1e-3


def recover(pruned: PrunedModel, teacher: torch.nn.Module, data, *, steps: int = DEFAULT_STEPS,
            lr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, temperature: float = DEFAULT_TEMPERATURE,
            seed: int = 0, augment: str | bool = DEFAULT_AUGMENT, dense_loss: str = DEFAULT_DENSE_LOSS,
            features: str | tuple = (), feature_weight: float = 1.0, progress: bool = True,
            callback: Callable[[int, torch.nn.Module], None] | None = None) -> PrunedModel:
    """A copy of ``pruned`` trained to reproduce ``teacher`` (the dense model) on unlabelled ``data``.

    Args:
        pruned: what `compile_pruned` returned (left as it is).
        teacher: the dense model ``pruned`` was compiled from, or any model with the same outputs (left
            as it is; a teacher in training mode is used through an eval-mode copy).
        data: a tensor (N, C, H, W) of model inputs (batches of ``batch_size`` drawn from seeded
            permutations), an iterable of image batches (each one global batch, used in order and
            started again when it ends; ``batch_size`` is then theirs) or a folder of images (read
            with `mambaprune.data.image_folder` at the model's input size, normalised from the
            teacher's pretrained_cfg / default_cfg, shuffled per pass from ``seed``).
        steps: optimiser steps. lr: peak AdamW learning rate (5% linear warm-up, then cosine to 0); None (the
            default): DENSE_LR (1e-3) for a model whose output maps (more than 2 dims) are distilled
            channel-wise (``dense_loss`` "channel", or "auto" on a lone output), DEFAULT_LR (3e-4) otherwise.
        batch_size: global batch (all processes together). temperature: of the softened logits.
        seed: the data order and the augmentation (the only randomness): the same seed gives bitwise
            the same weights on one thread.
        augment: "mixup+shift" (the default), "mixup", "shift" or "none" (True / False: "mixup+shift" / "none"):
            each global batch augmented before the teacher and the student see it, both the SAME
            images ("function matching", Beyer et al. 2022; api/augment.py): shift = a random
            translation of up to 1/8 of the image per image, mixup = a random convex mix of two
            images of the batch (no labels involved). The data passed in is never modified.
        dense_loss: how an output with more than 2 dims is distilled: "mse" (its squared error relative to the
            teacher's mean square: feature maps), "kl" (per-position logits over dim 1, e.g. segmentation
            logits (B, classes, H, W): the KL at ``temperature`` at every position, averaged over them),
            "channel" (each channel's map softened over its positions at ``temperature``, the KL averaged over
            the channels: channel-wise distillation) or "auto" (the default: a lone output "channel", feature
            maps in a tuple / list / dict "mse"). A (batch, classes) output is always distilled by the KL.
        features: teacher submodule name(s) whose input tensors are matched too (e.g. ``"decode_head"``: the
            feature maps a decoder reads, in the pruned model restored to full size), each by its squared
            error relative to the teacher's mean square, times ``feature_weight`` (api/recover_features.py).
        progress: a tqdm bar (rank 0 only). callback: called as ``callback(step, module)`` after
            every step (``module`` is the model being trained; e.g. to evaluate along the way).

    Returns a new PrunedModel: the same report with a `RecoveryRecord` (steps, wall time, loss at
    every step, lr, temperature), and the same export paths (.onnx, .pt2, ...). Under torch.distributed
    every rank returns the same weights; write them from rank 0.
    """
    _check(pruned, teacher, steps, DEFAULT_LR if lr is None else lr, batch_size, temperature, seed)
    dense_loss = check_dense_loss(dense_loss)
    lr = default_lr(pruned, dense_loss) if lr is None else lr
    augment = check_augment(augment)
    features = check_features(features, teacher)
    _check_positive("feature_weight", feature_weight)
    rank, world = distributed.rank_and_world()
    device = next((spec[2] for spec in pruned._input_spec if spec is not None), torch.device("cpu"))
    student = copy.deepcopy(pruned.graph_module).train()
    trainable = [p for p in student.parameters() if p.is_floating_point()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    training = distributed.wrap(with_features(student, features) if features else student, device)
    adam, schedule = optimiser(trainable, lr, steps)
    target_model = copy.deepcopy(teacher).eval() if teacher.training else teacher
    image_shape = next((spec[0] for spec in pruned._input_spec if spec is not None), ())
    stream = global_batches(data, batch_size, seed, image_shape, teacher)
    losses = []
    start = time.perf_counter()
    with tqdm(total=steps, desc="recover", disable=not progress or rank != 0) as bar:
        for step in range(steps):
            batch = next(stream)
            x = shard(augment_batch(batch, augment, seed, step), rank, world).to(device)
            if step == 0:
                pruned.check_inputs((x,))
            with torch.no_grad(), TeacherFeatures(target_model, features) as taught:
                target = outputs_of(target_model(x))
                target_features = taught.take() if features else []
            output = training(x)
            output, output_features = output if features else (output, [])
            loss = output_distillation_loss(outputs_of(output), target, temperature, len(batch), world, dense_loss)
            if features:
                loss = loss + feature_weight * feature_matching_loss(
                    _paired(feature_tensors(output_features), target_features, features), target_features,
                    len(batch), world)
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
            schedule.step()
            losses.append(distributed.global_sum(loss).item() / world)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if callback is not None:
                callback(step + 1, student)
    seconds = time.perf_counter() - start
    student.train(pruned.graph_module.training)
    record = RecoveryRecord(steps, round(seconds, 3), losses, float(lr), float(temperature), _global_batch(data, batch_size),
                            int(seed), world, augment, dense_loss, features, float(feature_weight) if features else 0.0)
    report = dataclasses.replace(pruned.report, recovery=record)
    return PrunedModel(student, report, _example_inputs(pruned), pruned.backend, pruned.static_batch, pruned.signature)


def _paired(student: list, teacher: list, names: tuple) -> list:
    """The student's feature tensors, checked against the teacher's (count and shapes) the first time."""
    if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
        raise InvalidArgumentError(
            f"recover: the tensors {', '.join(names)} read{'s' if len(names) == 1 else ''} differ between the pruned "
            f"model ({[tuple(s.shape) for s in student]}) and the teacher ({[tuple(t.shape) for t in teacher]}): name "
            "a module that reads full-size tensors in both (a decoder over restored maps), not one inside the pruned "
            "blocks")
    return student


def _global_batch(data, batch_size: int):
    return batch_size if isinstance(data, (torch.Tensor, str)) or hasattr(data, "__fspath__") else "as given"


def _example_inputs(pruned: PrunedModel) -> tuple:
    batch = pruned.static_batch or 1
    return tuple(None if spec is None else torch.zeros((batch, *spec[0]), dtype=spec[1], device=spec[2])
                 for spec in pruned._input_spec)


def default_lr(pruned: PrunedModel, dense_loss: str) -> float:
    """The lr `recover` uses when none is given: DENSE_LR when the model's output maps (more than 2 dims)
    are distilled channel-wise (``dense_loss`` "channel", or "auto" on a lone tensor output), else
    DEFAULT_LR. Read from the pruned graph's output values, before any image runs."""
    graph = pruned.graph_module.graph
    output = next(iter(graph.find_nodes(op="output")))
    values = [leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else leaf
              for leaf in pytree.tree_leaves(output.args[0])]
    outputs = graph._codegen.process_outputs(values)
    channel = dense_loss == "channel" or (dense_loss == "auto" and isinstance(outputs, torch.Tensor))
    maps = any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 2 for v in pytree.tree_leaves(outputs))
    return DENSE_LR if channel and maps else DEFAULT_LR


def _check(pruned, teacher, steps, lr, batch_size, temperature, seed) -> None:
    if not isinstance(pruned, PrunedModel):
        raise InvalidArgumentTypeError(f"recover expects the PrunedModel compile_pruned returned; got {type(pruned).__name__}")
    if not isinstance(teacher, torch.nn.Module):
        raise InvalidArgumentTypeError(f"recover expects the dense model (a torch.nn.Module) as teacher; got {type(teacher).__name__}")
    for name, value, positive_int in (("steps", steps, True), ("batch_size", batch_size, True), ("seed", seed, False)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < (1 if positive_int else 0):
            raise InvalidArgumentError(f"recover: {name} must be an int >= {1 if positive_int else 0}; got {value!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        _check_positive(name, value)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise InvalidArgumentError(f"recover: {name} must be a positive number; got {value!r}")
