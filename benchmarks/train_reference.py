"""Train the reference checkpoints on cluttered digits (CPU or GPU), seeded, with a progress bar.

    python benchmarks/train_reference.py --name vim_digits            # one digit, ViM-style
    python benchmarks/train_reference.py --name vim_digits_pair       # two digits, (a + b) mod 10
    python benchmarks/train_reference.py --name plainmamba_digits

Writes mambaprune/models/checkpoints/<name>.safetensors (fp16, with its dense test accuracy) and
benchmarks/results/training/<name>.json (the log). Every batch is freshly generated from the
training digit scans, so the model never sees a validation or test digit. Ctrl-C (or SIGTERM) stops
the run early; what was trained so far is still evaluated, saved and logged (``stopped_at_step``).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

import torch
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


def train(name: str, steps: int, batch_size: int, lr: float, seed: int, threads: int, evals: int, device: str,
          resume: bool = False) -> dict:
    factory, overrides, variant = REFERENCE_CONFIGS[name]
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    model = (load_pretrained(name) if resume else create_model(factory, **overrides)).to(device).train()
    img_size = overrides["img_size"]
    val = make_cluttered_digits("val", 500, variant, img_size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    log = {"name": name, "factory": factory, "overrides": overrides, "variant": variant, "steps": steps,
           "batch_size": batch_size, "lr": lr, "seed": seed, "device": device, "history": []}
    if resume:  # a second run continuing the shipped checkpoint: keep the first run's log
        log["resumed_from"] = json.loads((RESULTS / f"{name}.json").read_text())
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
        loss = F.cross_entropy(model(batch.inputs.to(device)), batch.labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
    args = parser.parse_args()
    log = train(args.name, args.steps, args.batch_size, args.lr, args.seed, args.threads, args.evals, args.device,
                args.resume)
    print(json.dumps({k: log[k] for k in ("name", "test_accuracy", "test_accuracy_fp16_weights", "train_minutes")}))


if __name__ == "__main__":
    main()
