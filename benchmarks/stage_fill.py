"""Hierarchical models: what the pruned cells should hold when a stage's grid is restored before its
downsampling (``compile_pruned(..., stage_fill="carry" | "zeros")``), measured on a trained model.

    python benchmarks/stage_fill.py              # trains the 4-stage VMamba-style test model (800 steps)
    python benchmarks/stage_fill.py --quick      # 60 training steps, 200 test images: a smoke run

No hierarchical checkpoint ships (the VMamba-style model is written in tests/architectures.py, in
someone else's style), so this trains one on one-digit cluttered digits (64x64, seeded), then
compares the fills at several FLOPs reductions, both with the paper's sites (one per stage where
possible) and with one site inside the first stage only: top-1 test accuracy, agreement with the
dense predictions and KL(dense || pruned). Writes benchmarks/results/stage_fill.{json,md}.
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
sys.path.insert(0, str(HERE.parent / "tests"))

import architectures  # noqa: E402
from fidelity import compare, logits_of  # noqa: E402
from train_reference import accuracy, learning_rate  # noqa: E402

from mambaprune.api import build, prepare  # noqa: E402
from mambaprune.planning import solve_site_keep  # noqa: E402
from mambaprune.settings import DEFAULT_METRIC, STAGE_FILLS, PruneSettings  # noqa: E402
from mambaprune.data import make_cluttered_digits  # noqa: E402
from mambaprune.errors import UnreachableRatioError  # noqa: E402

MODEL = "vmamba_4_stages"
IMG_SIZE = 64
RESULTS = HERE / "results"


def train(steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> tuple:
    model = architectures.build(MODEL, seed=seed).train()
    head = model.head
    model.head = torch.nn.Linear(head.in_features, 10)  # the digits' 10 classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    history, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc=f"train {MODEL}", mininterval=10):
        batch = make_cluttered_digits("train", batch_size, "one", IMG_SIZE, seed=seed * 1_000_003 + step + 1)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        loss = F.cross_entropy(model(batch.inputs), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    minutes = (time.perf_counter() - start) / 60
    return model.eval(), {"steps": steps, "final_loss": sum(history[-20:]) / len(history[-20:]),
                          "train_minutes": round(minutes, 2)}


def run(steps: int, test_size: int, ratios) -> dict:
    model, training = train(steps)
    test = make_cluttered_digits("test", test_size, "one", IMG_SIZE, seed=0)
    training["dense_test_accuracy"] = accuracy(model, test)
    model.eval()
    dense = logits_of(model, test)
    prepared = prepare(model, (test.inputs[:2],))
    first_stage = [k for k in prepared.analysis.valid_sites if prepared.analysis.site_length(k) == 256]
    rows = []
    for schedule_name, schedule in (("paper", None), ("first stage only", "first")):
        for ratio in ratios:
            for fill in STAGE_FILLS:
                row = {"schedule": schedule_name, "ratio": ratio, "stage_fill": fill}
                try:
                    settings = PruneSettings(ratio, None, "hold", fill=fill) if schedule is None else \
                        PruneSettings(0.0, {first_stage[0]: _first_stage_keep(prepared, first_stage[0], ratio)},
                                      "hold", fill=fill)
                    pruned = build(prepared, settings)
                except (UnreachableRatioError, ValueError) as err:
                    rows.append({**row, "unreachable": str(err)})
                    continue
                row.update(sites=pruned.report.sites, achieved=round(pruned.report.achieved_ratio, 4),
                           **compare(dense, logits_of(pruned, test), test.labels))
                rows.append(row)
    return {"model": MODEL, "img_size": IMG_SIZE, "test_size": test_size, "alignment": "hold",
            "metric": DEFAULT_METRIC, "training": training, "rows": rows}


def _first_stage_keep(prepared, site: int, ratio: float) -> float:
    """The keep rate at `site` whose estimated reduction is closest to `ratio` (bisection in plan)."""
    plan = solve_site_keep(prepared.analysis, prepared.flops, {}, site, ratio)
    if ratio - plan.estimated_ratio > 0.03:
        raise UnreachableRatioError(f"{ratio} is beyond a single first-stage site (max {plan.estimated_ratio:.3f})")
    return max(plan.keeps[site], 1e-6)


def markdown(result: dict) -> str:
    t = result["training"]
    lines = [f"### stage_fill on {result['model']} ({result['img_size']}x{result['img_size']}, trained {t['steps']} "
             f"steps, {t['train_minutes']} min; dense test accuracy {t['dense_test_accuracy']:.3f} on "
             f"{result['test_size']} images; alignment {result['alignment']}, metric {result['metric']})\n",
             "Top-1 accuracy / agreement with dense / KL:\n",
             "| schedule | FLOPs reduction | sites (kept tokens) | carry | zeros |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["schedule"], r["ratio"]) for r in result["rows"]))
    for schedule, ratio in keys:
        cells, sites = [], "-"
        for fill in STAGE_FILLS:
            row = next(r for r in result["rows"] if (r["schedule"], r["ratio"], r["stage_fill"]) == (schedule, ratio, fill))
            if "unreachable" in row:
                cells.append("unreachable")
                continue
            sites = ", ".join(f"{k}: {v}" for k, v in row["sites"].items())
            cells.append(f"{row['accuracy']:.3f} / {row['agreement']:.3f} / {row['kl']:.3f}")
        lines.append(f"| {schedule} | -{ratio:.0%} | {sites} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="60 steps, 200 test images")
    args = parser.parse_args()
    torch.manual_seed(0)
    steps, test_size = (60, 200) if args.quick else (args.steps, args.test_size)
    result = run(steps, test_size, (0.1, 0.2, 0.3, 0.4))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stage_fill.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "stage_fill.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
