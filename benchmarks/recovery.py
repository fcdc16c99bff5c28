"""Recovery after pruning: label-free distillation (`mambaprune.recover`) against training-free pruning
and against fine-tuning with labels, on the shipped cluttered-digits checkpoints.

    python benchmarks/recovery.py --models vim_digits --ratios 0.3            # one checkpoint, one ratio
    python benchmarks/recovery.py --models vim_digits --ratios 0.3 --methods distill --steps 1000
    python benchmarks/recovery.py --report-only                                # redo the .md and .png

Each (checkpoint, ratio) starts from the best training-free configuration recorded in
benchmarks/results/fidelity_NAME.json (highest test top-1 at that FLOPs reduction; schedule / alignment
"auto" calibrated on 256 validation images, as fidelity.py does). It is trained ONCE for --steps steps on
unlabelled validation-split images (make_cluttered_digits("val", --train-images, seed=2): digit scans
disjoint from the test split's) and evaluated along the way (--evals, e.g. 100 300 1000) on the 500 test
images: top-1, agreement with the dense model's predictions, KL(dense || pruned), and the wall time of
the training so far. "labels" fine-tunes the same pruned model with cross-entropy on the same images in
the same order WITH their labels, same optimiser and schedule. The learning-rate schedule spans --steps,
so the 100-step point of a 1000-step run is still at a high learning rate.

Rows are appended to benchmarks/results/recovery_digits.json (a rerun of the same checkpoint, ratio,
method and hyper-parameters replaces its row); recovery_digits.md and recovery_digits.png (top-1
against steps) are rebuilt from all rows. Wall times come from a 2-core VM shared with other jobs.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from fidelity import compare, logits_of  # noqa: E402

from mambaprune import recover  # noqa: E402
from mambaprune.api import build, prepare  # noqa: E402
from mambaprune.api.distill import optimiser  # noqa: E402
from mambaprune.api.recover_data import global_batches  # noqa: E402
from mambaprune.data import make_cluttered_digits  # noqa: E402
from mambaprune.models.pretrained import checkpoint_info, load_pretrained  # noqa: E402
from mambaprune.settings import PruneSettings  # noqa: E402

RESULTS = HERE / "results"
OUT = RESULTS / "recovery_digits"
MODELS = ("vim_digits", "plainmamba_digits", "plainmamba_digits_pair")


def best_training_free(name: str, ratio: float) -> dict:
    """The fidelity row with the highest test top-1 at ``ratio`` (ties: the first, the simplest setting)."""
    rows = json.loads((RESULTS / f"fidelity_{name}.json").read_text())["rows"]
    rows = [r for r in rows if r["group"] != "dense" and r["ratio"] == ratio and "accuracy" in r]
    if not rows:
        raise SystemExit(f"{name}: no reachable fidelity row at ratio {ratio}")
    return max(rows, key=lambda r: r["accuracy"])


def settings_of(row: dict) -> PruneSettings:
    schedule = row["schedule"].split(",")[0]
    return PruneSettings(row["ratio"], None if schedule == "paper" else schedule, row["alignment"], row["metric"])


def evaluate(module, test, dense: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = torch.cat([module(x) for x, _ in test.batches(100)])
    return {k: round(v, 4) for k, v in compare(dense, logits, test.labels).items()}


class Along:
    """The callback: evaluates at the chosen steps, keeping the training wall time apart from the evaluations."""

    def __init__(self, evals, test, dense):
        self.evals, self.test, self.dense = set(evals), test, dense
        self.points, self.start, self.paused = [], time.perf_counter(), 0.0

    def __call__(self, step: int, module) -> None:
        if step in self.evals:
            began = time.perf_counter()
            self.points.append({"steps": step, "seconds": round(began - self.start - self.paused, 1),
                                **evaluate(module, self.test, self.dense)})
            self.paused += time.perf_counter() - began
            print(f"  step {step}: {self.points[-1]}", flush=True)


def fine_tune_with_labels(pruned, train, steps, lr, batch_size, seed, callback) -> None:
    """Cross-entropy on (image, label), same image order (recover's seeded permutations), optimiser and schedule."""
    student = pruned.graph_module   # a fresh build, trained in place
    student.train()
    adam, schedule = optimiser(list(student.parameters()), lr, steps)
    order = global_batches(torch.arange(len(train)), batch_size, seed, (), None)
    for step in range(steps):
        chosen = next(order)
        loss = F.cross_entropy(student(train.inputs[chosen]), train.labels[chosen])
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        schedule.step()
        callback(step + 1, student)


def run(name: str, ratio: float, methods, args):
    """Yields one row per method, each trained from the same training-free pruned model (built once)."""
    info = checkpoint_info(name)
    model = load_pretrained(name)
    img_size = info.overrides["img_size"]
    test = make_cluttered_digits("test", args.test_images, info.variant, img_size, seed=0)
    train = make_cluttered_digits("val", args.train_images, info.variant, img_size, seed=2)
    dense = logits_of(model, test)
    best = best_training_free(name, ratio)
    settings = settings_of(best)
    calibration = None
    if settings.needs_calibration:
        calibration = [x for x, _ in make_cluttered_digits("val", 256, info.variant, img_size, seed=1).batches(32)]
    built = build(prepare(model, (test.inputs[:2],)), settings, calibration)
    start_point = {"steps": 0, "seconds": 0.0, **evaluate(built, test, dense)}
    for method in methods:
        pruned = copy.deepcopy(built)
        print(f"{name} ratio {ratio} {method}: from {best['schedule']} / {best['alignment']} (achieved "
              f"{pruned.report.achieved_ratio:.3f}): {start_point}", flush=True)
        along = Along(args.evals, test, dense)
        began = time.perf_counter()
        if method == "distill":
            recover(pruned, model, train.inputs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    temperature=args.temperature, seed=args.seed, augment=args.augment, progress=False, callback=along)
        else:
            fine_tune_with_labels(pruned, train, args.steps, args.lr, args.batch_size, args.seed, along)
        yield {"model": name, "ratio": ratio, "method": method, "achieved": round(pruned.report.achieved_ratio, 4),
               "start": {"schedule": best["schedule"], "alignment": best["alignment"], "metric": best["metric"]},
               "dense": evaluate(model, test, dense), "training_free": start_point, "points": along.points,
               "steps": args.steps, "lr": args.lr, "temperature": args.temperature if method == "distill" else None,
               "augment": args.augment if method == "distill" else "none",
               "batch_size": args.batch_size, "seed": args.seed, "train_images": args.train_images,
               "test_images": args.test_images, "total_seconds": round(time.perf_counter() - began, 1),
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python", "benchmarks/recovery.py", *sys.argv[1:]])}


def _key(row: dict) -> tuple:
    return (row["model"], row["ratio"], row["method"], row["steps"], row["lr"], row["temperature"], row["batch_size"],
            row.get("augment", "none"), row.get("seed", 0))


def merge(rows: list, new: dict) -> list:
    return [r for r in rows if _key(r) != _key(new)] + [new]


def markdown(rows: list) -> str:
    lines = [("Top-1 / agreement with dense on 500 test images after recovery (steps along one run; wall time of the "
              "training so far on a 2-core CPU VM shared with other jobs, 1 thread: indicative only)\n"),
             "| checkpoint | FLOPs | method | augment | batch | steps | seed | lr | T | dense | training-free "
             "| 100 steps | 300 steps | 1000 steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 9, r["ratio"],
                                         r["method"], r.get("augment", "none"), r["batch_size"], r["steps"], r["lr"],
                                         r["temperature"] or 0, r.get("seed", 0))):
        cells = {p["steps"]: f"{p['accuracy']:.3f} / {p['agreement']:.3f} ({p['seconds']:.0f} s)" for p in r["points"]}
        tf = r["training_free"]
        lines.append(f"{_setting(r)} | {r.get('seed', 0)} | {r['lr']:g} | {_temperature(r)} | {r['dense']['accuracy']:.3f} | "
                     f"{tf['accuracy']:.3f} / {tf['agreement']:.3f} ({r['start']['alignment']}) | "
                     + " | ".join(cells.get(s, "not run" if s <= r["steps"] else "-") for s in (100, 300, 1000)) + " |")
    lines += seed_summary(rows)
    lines.append("\nCommands: " + "; ".join(sorted({f"`{r['command']}`" for r in rows})))
    return "\n".join(lines) + "\n"


def _setting(r: dict) -> str:
    """A row's first table cells: checkpoint, FLOPs, method, augment, batch, steps."""
    return (f"| {r['model']} | -{100 * r['achieved']:.1f}% | {r['method']} | {r.get('augment', 'none')} | "
            f"{r['batch_size']} | {r['steps']}")


def _temperature(r: dict) -> str:
    return str(r["temperature"]) if r["temperature"] is not None else "-"


def seed_summary(rows: list, at: int = 300) -> list:
    """Markdown lines: for every setting run with several seeds, top-1 after ``at`` steps over the seeds (mean,
    lowest, highest) and the mean drop from dense in points."""
    groups: dict = {}
    for r in rows:
        point = next((p for p in r["points"] if p["steps"] == at), None)
        if point is not None:
            groups.setdefault(_key(r)[:-1], []).append((r, point["accuracy"]))
    several = {k: v for k, v in groups.items() if len(v) > 1}
    if not several:
        return []
    lines = [f"\nOver seeds, top-1 after {at} steps (mean, lowest - highest; drop from dense in points, mean):\n",
             "| checkpoint | FLOPs | method | augment | batch | steps | lr | T | seeds | top-1 mean | lowest - highest "
             "| drop (points) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(several, key=str):
        runs = several[key]
        r, accuracies = runs[0][0], [a for _, a in runs]
        mean = sum(accuracies) / len(accuracies)
        seeds = ", ".join(str(run.get("seed", 0)) for run, _ in sorted(runs, key=lambda ra: ra[0].get("seed", 0)))
        lines.append(f"{_setting(r)} | {r['lr']:g} | {_temperature(r)} | {seeds} | {mean:.3f} | "
                     f"{min(accuracies):.3f} - {max(accuracies):.3f} | {100 * (r['dense']['accuracy'] - mean):.1f} |")
    return lines


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["ratio"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (model, ratio) in zip(axes[0], groups):
        mine = [r for r in rows if (r["model"], r["ratio"]) == (model, ratio)]
        for r in mine:
            points = [r["training_free"], *r["points"]]
            ax.plot([max(p["steps"], 1) for p in points], [p["accuracy"] for p in points], marker="o",
                    label=f"{r['method']} {r.get('augment', 'none')} ({r['steps']} st, lr {r['lr']:g})")
        ax.axhline(mine[0]["dense"]["accuracy"], color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set(title=f"{model}, -{100 * mine[0]['achieved']:.0f}% FLOPs", xlabel="steps (1 = training-free)",
               ylabel="test top-1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=["distill", "labels"], choices=("distill", "labels"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--evals", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", default="none", choices=("none", "shift", "mixup", "mixup+shift"),
                        help="distill only (recover's augment=); labels always trains on the images as they are")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = OUT.with_suffix(".json")
    rows = json.loads(path.read_text()) if path.exists() else []
    if not args.report_only:
        for name in args.models:
            for ratio in args.ratios:
                for row in run(name, ratio, args.methods, args):
                    rows = merge(json.loads(path.read_text()) if path.exists() else [], row)
                    path.write_text(json.dumps(rows, indent=1))
    OUT.with_suffix(".md").write_text(markdown(rows))
    plot(rows, OUT.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
