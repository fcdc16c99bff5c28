"""Train the segmentation checkpoints on cluttered-digit masks (per-pixel cross-entropy), seeded.

    OMP_NUM_THREADS=1 python benchmarks/train_segmentation.py --name vim_digits_seg --steps 450 --batch-size 16
    OMP_NUM_THREADS=1 python benchmarks/train_segmentation.py --name plainmamba_digits_seg --steps 500 --batch-size 16
    OMP_NUM_THREADS=1 python benchmarks/train_segmentation.py --name vim_digits_seg --steps 400 --resume  # a second run

The backbone starts from the shipped classification checkpoint of the same architecture (``--backbone``,
default vim_digits / plainmamba_digits: their head dropped), the decoder from scratch. Every batch is
freshly generated from the training digit scans (two digits per image, masks of their ink, class 10 the
background). Writes mambaprune/models/checkpoints/<name>.safetensors (fp16; its dense test mIoU and pixel
accuracy with fp16 weights in the metadata) and benchmarks/results/training/<name>.json (the log).
Ctrl-C (or SIGTERM) stops early; what was trained is still evaluated, saved and logged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from train_reference import _stop_requested, learning_rate  # noqa: E402

from mambaprune.data import SEG_CLASSES, confusion_matrix, make_cluttered_digits, mean_iou, pixel_accuracy  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.models.pretrained import REFERENCE_CONFIGS, load_pretrained, save_pretrained  # noqa: E402

RESULTS = HERE / "results" / "training"
BACKBONES = {"vim_digits_seg": "vim_digits", "plainmamba_digits_seg": "plainmamba_digits"}


@torch.no_grad()
def segmentation_scores(model, data, batch_size: int = 50) -> dict:
    """Dense mIoU and pixel accuracy of ``model`` on ``data`` (made with masks=True)."""
    was_training = model.training
    model.eval()
    confusion = sum(confusion_matrix(model(x).argmax(1), y, SEG_CLASSES) for x, y in data.mask_batches(batch_size))
    model.train(was_training)
    return {"miou": round(mean_iou(confusion), 4), "pixel_accuracy": round(pixel_accuracy(confusion), 4)}


def initial_model(name: str, backbone: str, resume: bool = False):
    """The shipped ``name`` (resume), or a new model whose backbone is the classification checkpoint ``backbone``."""
    if resume:
        return load_pretrained(name)
    factory, overrides, _ = REFERENCE_CONFIGS[name]
    model = create_model(factory, **overrides)
    weights = {k: v for k, v in load_pretrained(backbone).state_dict().items() if not k.startswith("head.")}
    model.backbone.load_state_dict(weights, strict=True)
    return model


def train(name: str, steps: int, batch_size: int, lr: float, seed: int, evals: int, backbone: str,
          resume: bool = False) -> dict:
    factory, overrides, variant = REFERENCE_CONFIGS[name]
    torch.manual_seed(seed)
    model = initial_model(name, backbone, resume).train()
    img_size = overrides["img_size"]
    val = make_cluttered_digits("val", 200, variant, img_size, seed=seed, masks=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    log = {"name": name, "factory": factory, "overrides": overrides, "variant": variant, "steps": steps,
           "batch_size": batch_size, "lr": lr, "seed": seed, "backbone_from": backbone,
           "threads": torch.get_num_threads(), "history": []}
    offset = 0
    if resume:  # a second run continuing the shipped checkpoint on new batches: keep the first run's log
        log["resumed_from"] = json.loads((RESULTS / f"{name}.json").read_text())
        offset = log["resumed_from"].get("stopped_at_step", log["resumed_from"]["steps"])
    start, running, stop = time.perf_counter(), None, _stop_requested()
    bar = tqdm(range(steps), desc=name, mininterval=10)
    for step in bar:
        if stop:
            log["stopped_at_step"] = step
            break
        batch = make_cluttered_digits("train", batch_size, variant, img_size, seed=seed * 1_000_003 + step + 1 + offset,
                                     masks=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        loss = F.cross_entropy(model(batch.inputs), batch.masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % max(1, steps // evals) == 0 or step + 1 == steps:
            val_scores = {f"val_{k}": v for k, v in segmentation_scores(model, val).items()}
            entry = {"step": step + 1, "loss": round(running, 4), **val_scores,
                     "minutes": round((time.perf_counter() - start) / 60, 2)}
            log["history"].append(entry)
            tqdm.write(json.dumps(entry))
    log["train_minutes"] = round((time.perf_counter() - start) / 60, 2)
    test = make_cluttered_digits("test", 500, variant, img_size, seed=seed, masks=True)
    log["test"] = segmentation_scores(model, test)
    half = create_model(factory, **overrides)
    half.load_state_dict({k: v.half().to(v.dtype) for k, v in model.state_dict().items()})
    log["test_fp16_weights"] = scores = segmentation_scores(half, test)
    checkpoint = save_pretrained(model, name, variant, scores["pixel_accuracy"], test_miou=scores["miou"])
    log["checkpoint"] = str(checkpoint.resolve().relative_to(HERE.resolve().parent))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(log, indent=2))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", choices=sorted(BACKBONES), required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evals", type=int, default=4, help="validation evaluations (200 images) during training")
    parser.add_argument("--backbone", help="shipped classification checkpoint the backbone starts from")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the shipped <name> (new warm-up and cosine schedule, new batches)")
    args = parser.parse_args()
    log = train(args.name, args.steps, args.batch_size, args.lr, args.seed, args.evals, args.backbone or BACKBONES[args.name],
                args.resume)
    print(json.dumps({k: log[k] for k in ("name", "test", "test_fp16_weights", "train_minutes")}))


if __name__ == "__main__":
    main()
