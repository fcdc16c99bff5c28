"""Fidelity of training-free pruning on the shipped cluttered-digits checkpoints.

    python benchmarks/fidelity.py                          # every shipped checkpoint, 500 test images
    python benchmarks/fidelity.py --models vim_digits      # one checkpoint
    python benchmarks/fidelity.py --quick                  # 100 test images, ratios 0.3 and 0.5
    python benchmarks/fidelity.py --calibration-images 64  # a smaller calibration set (default 256)

For FLOPs reductions 0.1-0.6: every alignment and alignment="auto" (default metric), every metric
(alignment auto), and the schedules paper / uniform / auto, the last also with alignment="auto"
(calibration: 256 validation images in batches of 32), each against the dense model:
top-1 test accuracy, agreement with the dense predictions and mean KL(dense || pruned). The automatic
schedule is compared with each baseline image by image: on how many test images only one of the two
is right, and the exact two-sided McNemar p-value of that split. Writes, per
checkpoint NAME, benchmarks/results/fidelity_NAME.{json,md}, fidelity_NAME_alignment.png,
fidelity_NAME_schedule.png and fidelity_kept_tokens_NAME.png. Each model is captured once
(``prepare``) and rebuilt per setting. Ratios a model cannot reach are recorded as unreachable.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mambaprune.api import build, prepare
from mambaprune.settings import ALIGNMENT_CHOICES, DEFAULT_METRIC, PruneSettings
from mambaprune.data import make_cluttered_digits
from mambaprune.errors import UnreachableRatioError
from mambaprune.models.pretrained import checkpoint_info, list_pretrained, load_pretrained
from mambaprune.runtime.token_index import METRICS
from mambaprune.visualize import plot_kept_tokens

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SCHEDULES = ("paper", "uniform", "auto")


@torch.no_grad()
def logits_of(model, data, batch_size: int = 100) -> torch.Tensor:
    return torch.cat([model(x) for x, _ in data.batches(batch_size)])


def compare(dense: torch.Tensor, pruned: torch.Tensor, labels: torch.Tensor) -> dict:
    kl = F.kl_div(pruned.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="batchmean")
    return {"accuracy": (pruned.argmax(-1) == labels).float().mean().item(),
            "agreement": (pruned.argmax(-1) == dense.argmax(-1)).float().mean().item(),
            "kl": kl.item()}


def paired_comparison(name: str, baseline: str, ratio: float, ours: torch.Tensor, theirs: torch.Tensor,
                      labels: torch.Tensor) -> dict:
    """Images only ``ours`` gets right (wins) and only ``theirs`` gets right (losses), with McNemar's exact p."""
    right, their_right = ours == labels, theirs == labels
    wins, losses = int((right & ~their_right).sum()), int((~right & their_right).sum())
    return {"schedule": name, "baseline": baseline, "ratio": ratio, "wins": wins, "losses": losses,
            "p_value": round(mcnemar_exact(wins, losses), 4)}


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test: P(a split at least this uneven | each discordant image is a coin flip)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def settings_grid(ratios) -> list:
    """(group, settings) pairs: alignments x ratios, metrics x ratios, schedules x ratios."""
    grid = [("alignment", PruneSettings(r, None, a, DEFAULT_METRIC)) for a in ALIGNMENT_CHOICES for r in ratios]
    grid += [("metric", PruneSettings(r, None, "auto", m)) for m in METRICS if m != DEFAULT_METRIC for r in ratios]
    grid += [("schedule", PruneSettings(r, s, a, DEFAULT_METRIC))
             for s, a in (("uniform", "hold"), ("auto", "hold"), ("auto", "auto")) for r in ratios]
    return grid


def schedule_label(settings: PruneSettings) -> str:
    """The schedule's name in the tables; the fully automatic setting is named by both choices."""
    name = settings.schedule or "paper"
    return f"{name}, alignment auto" if settings.alignment == "auto" and name == "auto" else name


def run_model(name: str, ratios, test_size: int, folder: Path, calibration_images: int = 256) -> dict:
    info = checkpoint_info(name)
    model = load_pretrained(name)
    img_size = info.overrides["img_size"]
    test = make_cluttered_digits("test", test_size, info.variant, img_size, seed=0)
    calibration_data = make_cluttered_digits("val", calibration_images, info.variant, img_size, seed=1)
    calibration = [x for x, _ in calibration_data.batches(32)]
    dense = logits_of(model, test)
    rows = [{"group": "dense", "ratio": 0.0, "achieved": 0.0, "alignment": "-", "metric": "-", "schedule": "-",
             **compare(dense, dense, test.labels)}]
    prepared = prepare(model, (test.inputs[:2],))
    predictions = {}  # (schedule label, ratio) -> test predictions, for the paired comparisons
    for group, settings in tqdm(settings_grid(ratios), desc=name):
        start = time.perf_counter()
        row = {"group": group, "ratio": settings.ratio, "alignment": settings.alignment, "metric": settings.metric,
               "schedule": schedule_label(settings)}
        try:
            pruned = build(prepared, settings, calibration if settings.needs_calibration else None)
        except UnreachableRatioError as err:
            rows.append({**row, "unreachable": str(err)})
            continue
        logits = logits_of(pruned, test)
        row.update(achieved=round(pruned.report.achieved_ratio, 4), **compare(dense, logits, test.labels),
                   seconds=round(time.perf_counter() - start, 1))
        if group == "schedule" or (group == "alignment" and settings.alignment == "hold"):
            predictions[(row["schedule"], settings.ratio)] = logits.argmax(-1)
        if pruned.report.schedule_search:
            row["auto_chose"] = pruned.report.schedule_search[0]
        if pruned.report.alignment_search:
            row["auto_alignment_chose"] = pruned.report.alignment_search[0]
        rows.append(row)
    pictures = make_cluttered_digits("test", 4, info.variant, img_size, seed=0)
    shown = build(prepared, PruneSettings(0.3, None, "auto", DEFAULT_METRIC), calibration)
    plot_kept_tokens(pictures.pictures(), shown.kept_positions(pictures.inputs), shown.report,
                     folder / f"fidelity_kept_tokens_{name}.png",
                     titles=[f"label {int(v)}" for v in pictures.labels])
    comparisons = [paired_comparison(ours, base, ratio, predictions[(ours, ratio)], predictions[(base, ratio)], test.labels)
                   for ours in ("auto", "auto, alignment auto") for base in ("paper", "uniform") for ratio in ratios
                   if (ours, ratio) in predictions and (base, ratio) in predictions]
    return {"name": name, "variant": info.variant, "test_size": test_size, "calibration_images": calibration_images,
            "rows": rows, "schedule_comparisons": comparisons}


def paper_rows(result: dict, alignment: str = "hold") -> list:
    """The rows at ``alignment``, the default metric, paper schedule (they sit in the alignment group)."""
    return [r for r in result["rows"] if r["group"] == "alignment" and r["alignment"] == alignment]


def markdown(results: list) -> str:
    lines = []
    for result in results:
        dense = result["rows"][0]
        lines.append(f"### {result['name']} ({result['variant']} digit{'s' if result['variant'] == 'two' else ''}, "
                     f"{result['test_size']} test images, dense accuracy {dense['accuracy']:.3f})\n")
        for group, key in (("alignment", "alignment"), ("metric", "metric"), ("schedule", "schedule")):
            rows = [r for r in result["rows"] if r["group"] == group]
            if group == "metric":
                rows = paper_rows(result, "auto") + rows
            if group == "schedule":
                rows = paper_rows(result) + rows
            ratios = sorted({r["ratio"] for r in rows})
            names = list(dict.fromkeys(r[key] for r in rows))
            lines.append(f"Top-1 accuracy / agreement with dense / KL by {group} "
                         f"({_condition(group)}):\n")
            lines.append(f"| {group} | " + " | ".join(f"-{r:.0%} FLOPs" for r in ratios) + " |")
            lines.append("|---|" + "---|" * len(ratios))
            for n in names:
                cells = []
                for ratio in ratios:
                    row = next((r for r in rows if r[key] == n and r["ratio"] == ratio), None)
                    cells.append(_cell(row))
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += comparison_table(result)
    return "\n".join(lines)


def comparison_table(result: dict) -> list:
    """schedule="auto" against each baseline, image by image: wins-losses (McNemar p)."""
    comparisons = result.get("schedule_comparisons", [])
    if not comparisons:
        return []
    ratios = sorted({c["ratio"] for c in comparisons})
    lines = ["schedule auto against each baseline on the same test images: images only auto gets right - "
             "images only the baseline gets right (exact McNemar p; alignment hold unless named):\n",
             "| auto vs | " + " | ".join(f"-{r:.0%} FLOPs" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for pair in dict.fromkeys((c["schedule"], c["baseline"]) for c in comparisons):
        cells = []
        for ratio in ratios:
            c = next((c for c in comparisons if (c["schedule"], c["baseline"], c["ratio"]) == (*pair, ratio)), None)
            cells.append("-" if c is None else f"+{c['wins']} -{c['losses']} (p {c['p_value']:.2f})")
        label = pair[1] if pair[0] == "auto" else f"{pair[1]} (auto with alignment auto)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _condition(group: str) -> str:
    return {"alignment": f"metric {DEFAULT_METRIC}; auto: [the alignment it chose]",
            "metric": "alignment auto: [the alignment it chose]",
            "schedule": f"metric {DEFAULT_METRIC}, alignment hold unless named"}[group]


def _cell(row) -> str:
    if row is None:
        return "-"
    if "unreachable" in row:
        return "unreachable"
    chose = f" [{row['auto_alignment_chose']}]" if "auto_alignment_chose" in row else ""
    return f"{row['accuracy']:.3f} / {row['agreement']:.3f} / {row['kl']:.3f}{chose}"


def plot(results: list, group: str, key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results):
        dense = result["rows"][0]["accuracy"]
        rows = [r for r in result["rows"] if r["group"] == group]
        if group == "schedule":
            rows = paper_rows(result) + rows
        for name in dict.fromkeys(r[key] for r in rows):
            points = sorted((r["achieved"], r["accuracy"]) for r in rows if r[key] == name and "achieved" in r)
            ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points], marker="o", label=name)
        ax.axhline(100 * dense, color="grey", linestyle="--", label="dense")
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(result["name"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="checkpoint names (default: all shipped classifiers)")
    parser.add_argument("--test-size", type=int, default=None, help="test images (default 500, 100 with --quick)")
    parser.add_argument("--quick", action="store_true", help="100 test images, ratios 0.3 and 0.5")
    parser.add_argument("--calibration-images", type=int, default=256,
                        help="validation images the automatic choices are made on (batches of 32; default 256)")
    parser.add_argument("--out", default=str(RESULTS / "fidelity"), help="output prefix: _NAME.json, _NAME.md, ... are appended")
    args = parser.parse_args()
    ratios = (0.3, 0.5) if args.quick else RATIOS
    test_size = args.test_size or (100 if args.quick else 500)
    for name in args.models or list_pretrained("classification"):
        out = Path(f"{args.out}_{name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        result = run_model(name, ratios, test_size, out.parent, args.calibration_images)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(markdown([result]))
        plot([result], "alignment", "alignment", out.with_name(out.name + "_alignment.png"))
        plot([result], "schedule", "schedule", out.with_name(out.name + "_schedule.png"))
        print(markdown([result]))

if __name__ == "__main__":
    main()
