"""Segmentation under token pruning: mIoU and pixel accuracy, dense vs pruned, on the shipped segmentation
checkpoints (cluttered-digit masks; benchmarks/train_segmentation.py trained them).

    OMP_NUM_THREADS=1 python benchmarks/segmentation.py                                   # the full run
    OMP_NUM_THREADS=1 python benchmarks/segmentation.py --models vim_digits_seg --test-images 200

For every FLOPs reduction (--ratios, default 0.2 0.3 0.4: -20 / -30 / -40 %), every fill (carry, nearest,
zeros: what a pruned position of a restored feature map holds) and every alignment (hold, none, decay), the
paper's schedule, training-free: mIoU / pixel accuracy on --test-images test images (digit scans disjoint
from training), achieved reduction, kept tokens per site. A ratio the planner refuses (it never keeps fewer
than 1/8 of the tokens at a site) is reported as unreachable with the largest reachable reduction. Then the
best training-free setting at --recover-ratio (0.3) is recovered label-free (`mambaprune.recover`: the
per-pixel logits distilled by relative squared error) for --recover-steps steps on unlabelled validation
images, and evaluated again. Writes benchmarks/results/segmentation_NAME.json / .md and a PNG of predicted
masks (dense, pruned, recovered) for 4 test images. Wall times come from a 2-core VM shared with other jobs.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from mambaprune import recover
from mambaprune.api import build, prepare
from mambaprune.data import BACKGROUND, SEG_CLASSES, confusion_matrix, make_cluttered_digits, mean_iou, pixel_accuracy
from mambaprune.errors import UnreachableRatioError
from mambaprune.models.pretrained import checkpoint_info, list_pretrained, load_pretrained
from mambaprune.settings import PruneSettings

RESULTS = Path(__file__).parent / "results"
FILLS = ("carry", "nearest", "zeros")
ALIGNMENTS = ("hold", "none", "decay")


@torch.no_grad()
def predictions(module, inputs: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """Per-pixel classes (n, S, S)."""
    return torch.cat([module(inputs[i:i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)])


def scores(predicted: torch.Tensor, masks: torch.Tensor, dense: torch.Tensor | None = None) -> dict:
    confusion = confusion_matrix(predicted, masks, SEG_CLASSES)
    out = {"miou": round(100 * mean_iou(confusion), 2), "pixel_accuracy": round(100 * pixel_accuracy(confusion), 2)}
    if dense is not None:   # how many pixels keep the dense model's class
        out["agreement"] = round(100 * (predicted == dense).float().mean().item(), 2)
    return out


def run_model(name: str, args) -> dict:
    info = checkpoint_info(name)
    model = load_pretrained(name)
    size = info.overrides["img_size"]
    test = make_cluttered_digits("test", args.test_images, info.variant, size, seed=0, masks=True)
    dense_pred = predictions(model, test.inputs)
    result = {"model": name, "variant": info.variant, "test_images": args.test_images, "dense": scores(dense_pred, test.masks),
              "rows": [], "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "command": " ".join(["OMP_NUM_THREADS=1 python", "benchmarks/segmentation.py", *sys.argv[1:]])}
    print(f"{name} dense: {result['dense']}", flush=True)
    prepared = prepare(model, (test.inputs[:1],))
    shown = {"dense": dense_pred[:4]}
    built = {}
    for ratio in args.ratios:
        for fill in args.fills:
            for alignment in args.alignments:
                row = {"ratio": ratio, "fill": fill, "alignment": alignment}
                began = time.perf_counter()
                try:
                    fast = build(prepared, PruneSettings(ratio=ratio, fill=fill, alignment=alignment))
                except UnreachableRatioError as err:
                    row["unreachable"] = str(err)
                    result["rows"].append(row)
                    print(f"  {row['ratio']} {fill} {alignment}: unreachable", flush=True)
                    continue
                pred = predictions(fast, test.inputs)
                row.update(achieved=round(fast.report.achieved_ratio, 4), sites=dict(fast.report.sites),
                           **scores(pred, test.masks, dense_pred), seconds=round(time.perf_counter() - began, 1))
                result["rows"].append(row)
                built[(ratio, fill, alignment)] = (fast, pred)
                print(f"  {ratio} {fill} {alignment}: {row}", flush=True)
    reachable = [r for r in result["rows"] if r["ratio"] == args.recover_ratio and "miou" in r]
    if reachable and args.recover_steps:
        best = max(reachable, key=lambda r: r["miou"])
        fast, pred = built[(best["ratio"], best["fill"], best["alignment"])]
        shown[f"pruned -{round(100 * args.recover_ratio)}% ({best['fill']}, {best['alignment']})"] = pred[:4]
        train = make_cluttered_digits("val", args.recover_images, info.variant, size, seed=2)
        began = time.perf_counter()
        better = recover(fast, model, train.inputs, steps=args.recover_steps, batch_size=args.recover_batch,
                         seed=0, progress=False)
        seconds = round(time.perf_counter() - began, 1)
        recovered = predictions(better, test.inputs)
        result["recovered"] = {"ratio": best["ratio"], "fill": best["fill"], "alignment": best["alignment"],
                               "achieved": best["achieved"], "steps": args.recover_steps, "batch_size": args.recover_batch,
                               "images": args.recover_images,
                               "training_free": {k: best[k] for k in ("miou", "pixel_accuracy", "agreement")},
                               **scores(recovered, test.masks, dense_pred), "seconds": seconds}
        shown[f"recovered ({args.recover_steps} steps)"] = recovered[:4]
        print(f"  recovered: {result['recovered']}", flush=True)
    plot(test, shown, RESULTS / f"segmentation_{name}.png", name)
    return result


def markdown(result: dict) -> str:
    d = result["dense"]
    lines = [f"## {result['model']} (two-digit masks, {result['test_images']} test images)", "",
             f"Dense: mIoU {d['miou']}, pixel accuracy {d['pixel_accuracy']}. {result['date']}, "
             f"{result['threads']} thread(s), a 2-core VM shared with other jobs: `{result['command']}`", "",
             "| FLOPs | fill | alignment | achieved | mIoU | pixel acc. | agreement with dense | kept tokens per site |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        head = f"| -{round(100 * r['ratio'])}% | {r['fill']} | {r['alignment']} |"
        if "unreachable" in r:
            reach = r["unreachable"].split(" is ")[-1].split(" ")[0]
            lines.append(f"{head} unreachable (max {reach}) | | | | |")
        else:
            sites = ", ".join(f"{k}: {v}" for k, v in r["sites"].items())
            lines.append(f"{head} {r['achieved']:.3f} | {r['miou']} | {r['pixel_accuracy']} | {r['agreement']} | {sites} |")
    if "recovered" in result:
        r = result["recovered"]
        lines += ["", f"Recovered (label-free `recover`, {r['steps']} steps, batch {r['batch_size']}, {r['images']} unlabelled "
                  f"validation images) from -{round(100 * r['ratio'])}% {r['fill']} / {r['alignment']} (achieved "
                  f"{r['achieved']:.3f}): mIoU {r['training_free']['miou']} -> {r['miou']}, pixel accuracy "
                  f"{r['training_free']['pixel_accuracy']} -> {r['pixel_accuracy']}, agreement with dense "
                  f"{r['training_free']['agreement']} -> {r['agreement']} ({r['seconds']} s)."]
    return "\n".join(lines) + "\n"


def plot(test, shown: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = list(plt.get_cmap("tab10").colors) + [(0.0, 0.0, 0.0)]       # digits 0-9, background black
    cmap = ListedColormap(colours)
    columns = [("image", None), ("truth", test.masks[:4])] + list(shown.items())
    fig, axes = plt.subplots(4, len(columns), figsize=(2 * len(columns), 8))
    for col, (label, masks) in enumerate(columns):
        for row in range(4):
            ax = axes[row, col]
            if masks is None:
                ax.imshow(test.pictures()[row].numpy())
            else:
                ax.imshow(masks[row].numpy(), cmap=cmap, vmin=0, vmax=BACKGROUND, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
    fig.suptitle(f"{title}: predicted masks (colour = digit class, black = background)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="checkpoint names (default: the shipped segmentation ones)")
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--fills", nargs="*", default=list(FILLS), choices=FILLS)
    parser.add_argument("--alignments", nargs="*", default=list(ALIGNMENTS), choices=ALIGNMENTS)
    parser.add_argument("--recover-ratio", type=float, default=0.3)
    parser.add_argument("--recover-steps", type=int, default=300, help="0: no recovery")
    parser.add_argument("--recover-batch", type=int, default=16)
    parser.add_argument("--recover-images", type=int, default=1000, help="unlabelled validation images")
    args = parser.parse_args()
    for name in args.models or list_pretrained("segmentation"):
        result = run_model(name, args)
        (RESULTS / f"segmentation_{name}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"segmentation_{name}.md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
