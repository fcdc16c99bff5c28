"""Training-free top-1 of drop vs merge on the shipped cluttered-digits checkpoints.

    python benchmarks/fidelity_merge.py                       # vim_digits and plainmamba_digits, 500 test images
    python benchmarks/fidelity_merge.py --models vim_digits --test-size 100

For FLOPs reductions 0.3 and 0.5 (the default paper schedule): reduction drop / merge-nearest /
merge-similar x metric novelty / clip / delta-max x alignment hold / none, each against the dense
model (top-1 test accuracy, its difference from dense in points, agreement with the dense predictions).
Each model is captured once (``prepare``) and rebuilt per setting. Writes, per checkpoint NAME,
benchmarks/results/fidelity_merge_NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mambaprune.api import build, prepare
from mambaprune.data import make_cluttered_digits
from mambaprune.errors import UnreachableRatioError, UnsupportedModelError
from mambaprune.models.pretrained import checkpoint_info, load_pretrained
from mambaprune.settings import REDUCTIONS, PruneSettings

from fidelity import logits_of

RESULTS = Path(__file__).parent / "results"
MODELS = ("vim_digits", "plainmamba_digits")
RATIOS = (0.3, 0.5)
METRICS = ("novelty", "clip", "delta-max")
ALIGNMENTS = ("hold", "none")


def run_model(name: str, test_size: int, save=lambda rows: None) -> list:
    info = checkpoint_info(name)
    model = load_pretrained(name)
    test = make_cluttered_digits("test", test_size, info.variant, info.overrides["img_size"], seed=0)
    dense = logits_of(model, test)
    dense_top1 = (dense.argmax(-1) == test.labels).float().mean().item()
    rows = [{"model": name, "ratio": 0.0, "achieved": 0.0, "alignment": "-", "metric": "-", "reduction": "dense",
             "top1": dense_top1, "points": 0.0, "agreement": 1.0}]
    prepared = prepare(model, (test.inputs[:2],))
    for ratio in RATIOS:
        for alignment in ALIGNMENTS:
            for metric in METRICS:
                for reduction in REDUCTIONS:
                    settings = PruneSettings(ratio, None, alignment, metric, reduction=reduction)
                    row = {"model": name, "ratio": ratio, "alignment": alignment, "metric": metric,
                           "reduction": reduction}
                    try:
                        pruned = build(prepared, settings)
                    except (UnreachableRatioError, UnsupportedModelError) as error:
                        rows.append({**row, "refused": str(error)})
                        continue
                    logits = logits_of(pruned, test)
                    top1 = (logits.argmax(-1) == test.labels).float().mean().item()
                    rows.append({**row, "achieved": round(pruned.report.achieved_ratio, 4), "top1": top1,
                                 "points": round(100 * (top1 - dense_top1), 1),
                                 "agreement": (logits.argmax(-1) == dense.argmax(-1)).float().mean().item()})
                    print(name, ratio, alignment, metric, reduction, f"{top1:.3f}", flush=True)
                    save(rows)
    return rows


def markdown(rows: list, meta: dict) -> str:
    lines = [f"# Training-free fidelity: drop vs merge ({meta['date']})", "",
             f"{meta['machine']}. Command: `{meta['command']}`. {meta['test_size']} test images per model; "
             "top-1 (points vs dense).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        dense = next(r for r in rows if r["model"] == model and r["reduction"] == "dense")
        lines += [f"## {model} (dense {100 * dense['top1']:.1f})", "",
                  "| ratio | alignment | metric | " + " | ".join(REDUCTIONS) + " |",
                  "|---|---|---|" + "---|" * len(REDUCTIONS)]
        for ratio in RATIOS:
            for alignment in ALIGNMENTS:
                for metric in METRICS:
                    cells = []
                    for reduction in REDUCTIONS:
                        row = next(r for r in rows if r["model"] == model and r["ratio"] == ratio
                                   and r["alignment"] == alignment and r["metric"] == metric
                                   and r["reduction"] == reduction)
                        cells.append("refused" if "refused" in row else
                                     f"{100 * row['top1']:.1f} ({row['points']:+.1f})")
                    lines.append(f"| {ratio} | {alignment} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--machine", default="2-core CPU VM, shared with other jobs (timings indicative)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for name in args.models:
        torch.manual_seed(0)
        started = time.time()
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": args.machine, "test_size": args.test_size,
                "command": f"OMP_NUM_THREADS=1 python benchmarks/fidelity_merge.py --models {name}"
                           + ("" if args.test_size == 500 else f" --test-size {args.test_size}")}

        def save(rows, complete=False):   # after every setting: a run stopped early keeps what it measured
            done = {**meta, "complete": complete, "minutes": round((time.time() - started) / 60, 1), "rows": rows}
            (RESULTS / f"fidelity_merge_{name}.json").write_text(json.dumps(done, indent=1))
        rows = run_model(name, args.test_size, save)
        save(rows, complete=True)
        (RESULTS / f"fidelity_merge_{name}.md").write_text(markdown(rows, meta))
        print(markdown(rows, meta))


if __name__ == "__main__":
    main()
