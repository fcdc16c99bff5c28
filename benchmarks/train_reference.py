"""Train the reference checkpoints on cluttered digits (CPU or GPU), seeded, with a progress bar.

    python benchmarks/train_reference.py --name vim_digits            # one digit, ViM-style
    python benchmarks/train_reference.py --name vim_digits_pair       # two digits, (a + b) mod 10
    python benchmarks/train_reference.py --name plainmamba_digits
    python benchmarks/train_reference.py --name plainmamba_digits_pair --init-from plainmamba_digits --aux-weight 1

Writes mambaprune/models/checkpoints/<name>.safetensors (fp16, with its dense test accuracy) and
benchmarks/results/training/<name>.json (the log). Every batch is freshly generated from the
training digit scans, so the model never sees a validation or test digit. Ctrl-C (or SIGTERM) stops
the run early; what was trained so far is still evaluated, saved and logged (``stopped_at_step``).

Two digits, label (a + b) mod 10, give no gradient to a model that recognises neither digit: knowing
one digit says nothing about the label. ``--init-from`` starts from a one-digit checkpoint of the
same architecture (its head re-initialised) and ``--aux-weight`` adds a training-only loss: a linear
probe on the mean token of the middle block predicts which digits are present (binary cross-entropy
on the multi-hot set {a, b}). The probe is dropped after training; the checkpoint is the model alone.

``--teacher`` trains a model of another architecture from a shipped one (vim2_digits from vim_digits):
the student starts from the teacher's weights wherever a parameter has the same name and shape (patch
and position embedding, class token, norms, head: not the mixers), and its loss adds the KL divergence
to the teacher's predictions at temperature 2 (weight ``--teacher-weight``) to the cross-entropy.
Cluttered digits keep a model from scratch at chance for its first ~750 steps (vim_digits' log); 312
steps with a teacher (vim2_digits, 2026-12-06) were not enough either, nor 500 of 2000 at lr 5e-4
(2026-12-07). ``--feature-weight`` adds hints (FitNets, Romero et al., ICLR 2015): the student's
stream after every block is matched to the teacher's after the same block (the same depth and width),
a dense signal while the logits are still at chance. With them vim2_digits left chance by step 500
(validation 0.17, 0.65 at 1000, 0.86 at 2000; 2026-12-07, lr 1e-3), and a ``--resume`` of 1500 steps at
5e-4 took it to 0.938 on validation, 0.925 on test.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mambaprune.data import make_cluttered_digits
from mambaprune.models import create_model
from mambaprune.models.pretrained import REFERENCE_CONFIGS, load_pretrained, save_pretrained

RESULTS = Path(__file__).parent / "results" / "training"


@torch.no_grad()
def accuracy(model, data, batch_size: int = 100) -> float:
    model.eval()
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in data.batches(batch_size))
    model.train()
    return correct / len(data)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class DigitSetProbe(nn.Module):
    """Training-only: predicts the multi-hot set of pasted digits from the mean token after a block."""

    def __init__(self, block: nn.Module, dim: int, classes: int = 10):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.tokens = None
        block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        # ViM blocks return (hidden, residual): the stream is their sum.
        self.tokens = sum(output) if isinstance(output, tuple) else output

    def loss(self, digits: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(len(digits), self.linear.out_features, device=digits.device).scatter_(1, digits, 1.0)
        logits = self.linear(self.norm(self.tokens.mean(dim=1)))
        return F.binary_cross_entropy_with_logits(logits, target)


def initial_model(name: str, resume: bool, init_from: str | None) -> nn.Module:
    """The shipped ``name`` (resume), a one-digit checkpoint with a fresh head (init_from), or a new model."""
    factory, overrides, _ = REFERENCE_CONFIGS[name]
    if resume:
        return load_pretrained(name)
    model = create_model(factory, **overrides)
    if init_from is not None:
        source_factory, source_overrides, _ = REFERENCE_CONFIGS[init_from]
        if (source_factory, source_overrides) != (factory, overrides):
            raise SystemExit(f"--init-from {init_from}: its architecture ({source_factory}, {source_overrides}) "
                             f"differs from {name}'s ({factory}, {overrides})")
        weights = {k: v for k, v in load_pretrained(init_from).state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(weights, strict=False)
    return model


def shared_weights(model: nn.Module, teacher: nn.Module) -> int:
    """Copy the teacher's parameters and buffers that ``model`` has under the same name and shape; the count."""
    own = model.state_dict()
    shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared)


class BlockStreams:
    """Training-only: the stream (hidden + residual) after every block of a ViM-style model, kept by hooks."""

    def __init__(self, model: nn.Module):
        self.streams: list = []
        self.blocks = list(model.layers)
        for block in self.blocks:
            block.register_forward_hook(lambda module, inputs, output: self.streams.append(
                sum(output) if isinstance(output, tuple) else output))

    def take(self) -> list:
        """The streams of the last forward (an evaluation in between left its own before them)."""
        streams, self.streams = self.streams[-len(self.blocks):], []
        return streams


def feature_loss(student: list, teacher: list) -> torch.Tensor:
    """FitNets-style hints: mean over blocks of the squared error between the two streams after the same
    block, relative to the teacher's mean square there (each block weighs the same whatever its scale)."""
    return sum(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6) for s, t in zip(student, teacher)) / len(teacher)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature**2


def train(name: str, steps: int, batch_size: int, lr: float, seed: int, threads: int, evals: int, device: str,
          resume: bool = False, init_from: str | None = None, aux_weight: float = 0.0, teacher_name: str | None = None,
          teacher_weight: float = 1.0, feature_weight: float = 0.0) -> dict:
    factory, overrides, variant = REFERENCE_CONFIGS[name]
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    model = initial_model(name, resume, init_from).to(device).train()
    teacher = load_pretrained(teacher_name).to(device).eval() if teacher_name else None
    copied = shared_weights(model, teacher) if teacher is not None and not resume else 0
    if feature_weight and (teacher is None or len(teacher.layers) != len(model.layers)):
        raise SystemExit("--feature-weight needs a --teacher with as many blocks")
    hints = (BlockStreams(model), BlockStreams(teacher)) if feature_weight else None
    img_size = overrides["img_size"]
    val = make_cluttered_digits("val", 500, variant, img_size, seed=seed)
    probe = DigitSetProbe(model.layers[len(model.layers) // 2], overrides["embed_dim"]).to(device) if aux_weight else None
    parameters = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    log = {"name": name, "factory": factory, "overrides": overrides, "variant": variant, "steps": steps,
           "batch_size": batch_size, "lr": lr, "seed": seed, "device": device, "init_from": init_from,
           "aux_weight": aux_weight, "teacher": teacher_name, "teacher_weight": teacher_weight,
           "feature_weight": feature_weight, "copied_from_teacher": copied, "history": []}
    if resume:  # a second run continuing the shipped checkpoint: keep the first run's log
        log["resumed_from"] = json.loads((RESULTS / f"{name}.json").read_text())
    if init_from is not None:  # the checkpoint it started from may be replaced later: keep its log
        log["init_from_log"] = json.loads((RESULTS / f"{init_from}.json").read_text())
    start, running = time.perf_counter(), None
    bar = tqdm(range(steps), desc=name, mininterval=10)
    stop = _stop_requested()
    offset = _steps_done(log.get("resumed_from"))  # a resumed run sees new batches
    for step in bar:
        if stop:
            log["stopped_at_step"] = step
            tqdm.write(f"stopped at step {step} (SIGINT/SIGTERM): evaluating and saving what was trained")
            break
        batch = make_cluttered_digits("train", batch_size, variant, img_size, seed=seed * 1_000_003 + step + 1 + offset)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        logits = model(batch.inputs.to(device))
        loss = F.cross_entropy(logits, batch.labels.to(device))
        total = loss + aux_weight * probe.loss(batch.digits.to(device)) if probe else loss
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch.inputs.to(device))
            total = total + teacher_weight * distillation_loss(logits, teacher_logits)
        if hints is not None:
            total = total + feature_weight * feature_loss(hints[0].take(), hints[1].take())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % max(1, steps // evals) == 0 or step + 1 == steps:
            entry = {"step": step + 1, "loss": round(running, 4), "val_accuracy": accuracy(model, _to(val, device)),
                     "minutes": round((time.perf_counter() - start) / 60, 2)}
            log["history"].append(entry)
            tqdm.write(json.dumps(entry))
    test = make_cluttered_digits("test", 1000, variant, img_size, seed=seed)
    log["test_accuracy"] = accuracy(model, _to(test, device))
    log["train_minutes"] = round((time.perf_counter() - start) / 60, 2)
    model = model.cpu().eval()
    half = create_model(factory, **overrides)
    half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    log["test_accuracy_fp16_weights"] = accuracy(half.eval(), test)
    checkpoint = save_pretrained(model, name, variant, log["test_accuracy_fp16_weights"])
    log["checkpoint"] = str(checkpoint.resolve().relative_to(Path(__file__).resolve().parents[1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(log, indent=2))
    return log


def _steps_done(previous) -> int:
    if previous is None:
        return 0
    return previous.get("stopped_at_step", previous["steps"]) + _steps_done(previous.get("resumed_from"))


def _stop_requested() -> list:
    """A list that becomes non-empty on SIGINT or SIGTERM, so a run can be cut short and still saved."""
    flag = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: flag.append(True))
    return flag


def _to(data, device):
    data.inputs, data.labels = data.inputs.to(device), data.labels.to(device)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", choices=sorted(REFERENCE_CONFIGS), required=True)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--evals", type=int, default=5, help="validation evaluations during training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the shipped checkpoint <name> (new warm-up and cosine schedule, new batches)")
    parser.add_argument("--init-from", choices=sorted(REFERENCE_CONFIGS),
                        help="start from this shipped checkpoint of the same architecture, head re-initialised")
    parser.add_argument("--aux-weight", type=float, default=0.0,
                        help="weight of the training-only digit-set loss on the middle block (0: off)")
    parser.add_argument("--teacher", choices=sorted(REFERENCE_CONFIGS),
                        help="distil from this shipped checkpoint, starting from its weights of the same name "
                             "and shape")
    parser.add_argument("--teacher-weight", type=float, default=1.0, help="weight of the distillation loss")
    parser.add_argument("--feature-weight", type=float, default=0.0,
                        help="weight of the hints: the stream after every block matched to the teacher's (0: off)")
    args = parser.parse_args()
    if args.resume and args.init_from:
        parser.error("--resume and --init-from exclude each other")
    log = train(args.name, args.steps, args.batch_size, args.lr, args.seed, args.threads, args.evals, args.device,
                args.resume, args.init_from, args.aux_weight, args.teacher, args.teacher_weight, args.feature_weight)
    print(json.dumps({k: log[k] for k in ("name", "test_accuracy", "test_accuracy_fp16_weights", "train_minutes")}))


if __name__ == "__main__":
    main()
