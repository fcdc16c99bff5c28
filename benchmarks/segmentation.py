"""Segmentation under token pruning: mIoU and pixel accuracy, dense vs pruned, on the shipped segmentation
checkpoints (cluttered-digit masks; benchmarks/train_segmentation.py trained them).

    OMP_NUM_THREADS=1 python benchmarks/segmentation.py                                   # the full run
    OMP_NUM_THREADS=1 python benchmarks/segmentation.py --models vim_digits_seg --test-images 200

For every FLOPs reduction (--ratios, default 0.2 0.3 0.4: -20 / -30 / -40 %), every fill (carry, nearest,
zeros: what a pruned position of a restored feature map holds) and every alignment (hold, none, decay), the
paper's schedule, training-free: mIoU / pixel accuracy on --test-images test images (digit scans disjoint
from training), achieved reduction, kept tokens per site. A ratio the planner refuses (it never keeps fewer
than 1/8 of the tokens at a site) is reported as unreachable with the largest reachable reduction. Then the
best training-free setting at --recover-ratio (0.3) is recovered label-free (`mambaprune.recover` with
--recover-dense-loss: the per-pixel logits distilled by relative squared error "mse" or per-pixel KL "kl";
--recover-features: also the maps the decoder reads, matched by relative squared error) for --recover-steps
steps on unlabelled validation images, once per --recover-seeds, and evaluated again. Where the pruned model
loses pixels is broken down by the site at which each pixel's token was pruned (never = kept to the end). Writes benchmarks/results/segmentation_NAME.json / .md and a PNG of predicted
masks (dense, pruned, recovered) for 4 test images. Wall times come from a 2-core VM shared with other jobs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mambaprune import recover
from mambaprune.api import build, prepare
from mambaprune.api.distill import DENSE_LOSSES
from mambaprune.api.recover import DEFAULT_DENSE_LOSS, DEFAULT_TEMPERATURE
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
        options = dict(steps=args.recover_steps, batch_size=args.recover_batch, lr=args.recover_lr,
                       temperature=args.recover_temperature, dense_loss=args.recover_dense_loss,
                       features=tuple(args.recover_features), feature_weight=args.recover_feature_weight)
        cls = getattr(model.backbone, "token_position", None)
        result["by_site"] = {"training_free": by_pruning_site(fast, test, pred, dense_pred, model.grid, cls)}
        result["recovered"] = []
        for seed in args.recover_seeds:
            began = time.perf_counter()
            better = recover(fast, model, train.inputs, seed=seed, progress=False, **options)
            seconds = round(time.perf_counter() - began, 1)
            recovered = predictions(better, test.inputs)
            result["recovered"].append({
                "ratio": best["ratio"], "fill": best["fill"], "alignment": best["alignment"], "achieved": best["achieved"],
                **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                "lr": better.report.recovery.lr, "seed": seed,
                "images": args.recover_images, "training_free": {k: best[k] for k in ("miou", "pixel_accuracy", "agreement")},
                **scores(recovered, test.masks, dense_pred), "seconds": seconds})
            result["by_site"][f"recovered, seed {seed}"] = by_pruning_site(better, test, recovered, dense_pred, model.grid, cls)
            shown[f"recovered ({args.recover_steps} steps, seed {seed})"] = recovered[:4]
            print(f"  recovered: {result['recovered'][-1]}", flush=True)
    plot(test, shown, RESULTS / (f"segmentation_{name}" + (f"_{args.tag}" if args.tag else "") + ".png"), name)
    return result


def by_pruning_site(fast, test, predicted: torch.Tensor, dense: torch.Tensor, grid: tuple, class_position,
                    batch_size: int = 50) -> dict:
    """{site at which a pixel's token was pruned ("never": kept to the end): % of the pixels, % of them that
    are ink, accuracy of the dense and of the pruned prediction on their ink pixels}. ``class_position``: the
    class token's place in the token sequence (ViM), None without one; ``grid``: the token grid (rows, columns)."""
    n, side = len(test.inputs), test.masks.shape[-1]
    rows, cols = grid
    pruned_at = torch.cat([_pruned_at(fast.kept_positions(test.inputs[i:i + batch_size]), rows * cols, class_position)
                           for i in range(0, n, batch_size)])
    cell = pruned_at.view(n, rows, cols).repeat_interleave(side // rows, 1).repeat_interleave(side // cols, 2)
    ink = test.masks != BACKGROUND
    out = {}
    for site in sorted(cell.unique().tolist()):
        where, inked = cell == site, (cell == site) & ink
        out["never" if site == NEVER else str(site)] = {
            "pixels": round(100 * where.float().mean().item(), 1), "ink": round(100 * ink[where].float().mean().item(), 1),
            "dense_ink_accuracy": round(100 * (dense[inked] == test.masks[inked]).float().mean().item(), 1),
            "ink_accuracy": round(100 * (predicted[inked] == test.masks[inked]).float().mean().item(), 1)}
    return out


NEVER = 10 ** 6


def _pruned_at(kept: dict, tokens: int, class_position) -> torch.Tensor:
    """(batch, grid tokens): the site at which each grid token was pruned, NEVER where it was kept to the end
    (``kept``: {site: (batch, K) kept positions in the token sequence}; the class token is never pruned)."""
    first = next(iter(kept.values()))
    pruned_at = torch.full((len(first), tokens), NEVER)
    alive = torch.ones(len(first), tokens, dtype=torch.bool)
    for site, pos in sorted(kept.items()):
        if class_position is not None:
            pos = pos[pos != class_position].view(len(pos), -1)
            pos = torch.where(pos > class_position, pos - 1, pos)
        now = torch.zeros_like(alive).scatter_(1, pos, True)
        pruned_at[alive & ~now] = site
        alive = now
    return pruned_at


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
    for r in result.get("recovered", []):
        how = f"{r['dense_loss']}, lr {r['lr']:g}, T {r['temperature']:g}" + (
            f", features of {', '.join(r['features'])} x {r['feature_weight']:g}" if r["features"] else "")
        lines += ["", f"Recovered (label-free `recover`, {r['steps']} steps, batch {r['batch_size']}, {how}, seed {r['seed']}, "
                  f"{r['images']} unlabelled validation images) from -{round(100 * r['ratio'])}% {r['fill']} / "
                  f"{r['alignment']} (achieved {r['achieved']:.3f}): mIoU {r['training_free']['miou']} -> {r['miou']}, "
                  f"pixel accuracy {r['training_free']['pixel_accuracy']} -> {r['pixel_accuracy']}, agreement with dense "
                  f"{r['training_free']['agreement']} -> {r['agreement']} ({r['seconds']} s)."]
    if result.get("by_site"):
        lines += ["", "Where the pixels are lost, by the site at which each pixel's token was pruned (never: kept to the "
                  "end): % of the pixels, % of them that are ink, accuracy on their ink pixels (dense -> this model):", "",
                  "| model | " + " | ".join("kept to the end" if k == "never" else f"pruned at {k}" for k in next(iter(result["by_site"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(result["by_site"].values())))]
        for label, sites in result["by_site"].items():
            lines.append(f"| {label} | " + " | ".join(f"{v['pixels']}% px, {v['ink']}% ink: {v['dense_ink_accuracy']} -> "
                                                        f"{v['ink_accuracy']}" for v in sites.values()) + " |")
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
    parser.add_argument("--tag", default="", help="written to segmentation_NAME[_TAG].json / .md / .png")
    parser.add_argument("--recover-seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--recover-lr", type=float, default=None, help="default: recover's own (1e-3 here)")
    parser.add_argument("--recover-temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--recover-dense-loss", default=DEFAULT_DENSE_LOSS, choices=DENSE_LOSSES)
    parser.add_argument("--recover-features", nargs="*", default=[], help="teacher submodules whose inputs are matched too")
    parser.add_argument("--recover-feature-weight", type=float, default=1.0)
    args = parser.parse_args()
    for name in args.models or list_pretrained("segmentation"):
        result = run_model(name, args)
        stem = f"segmentation_{name}" + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"{stem}.md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
