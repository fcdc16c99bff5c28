"""What merging the pruned tokens costs on top of dropping them: the pruned model's time, drop vs merge.

    python benchmarks/merge_cost.py            # ViM-T (batch 1 and 8) and PlainMamba-L1 (batch 1) at 224, ratio 0.3
    python benchmarks/merge_cost.py --quick    # ViM-T at 112, batch 1, two rounds: checks the script

For each model (random weights: the cost does not depend on them) the pruned graph is built with
reduction drop / merge-nearest / merge-similar (alignment hold, the default paper sites, ratio 0.3) and
the three are timed round robin in one block (mambaprune.runtime.timing.interleaved: best of the
rounds, a block during which other processes took more than 10% of the CPU measured again). Cost of a
merge = its time / drop's time - 1; the target is at most 5%. Also the MACs the pruned graphs count
(merge-similar's cosine similarity is a bmm). Writes benchmarks/results/merge_cost.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune import create_model  # noqa: E402
from mambaprune.api import build, prepare  # noqa: E402
from mambaprune.runtime import timing  # noqa: E402
from mambaprune.settings import REDUCTIONS, PruneSettings  # noqa: E402

MODELS = ("vim_t", "plainmamba_l1")
BURST_MS = 50.0


def rows_for(name: str, img_size: int, batches, rounds: int, attempts: int, ratio: float) -> list:
    torch.manual_seed(0)
    model = create_model(name, img_size=img_size).eval()
    x = torch.randn(max(batches), 3, img_size, img_size)
    prepared = prepare(model, (x[:1],))
    pruned = {r: build(prepared, PruneSettings(ratio, None, "hold", reduction=r)) for r in REDUCTIONS}
    rows = []
    for batch in batches:
        inputs = x[:batch]

        def call(model):
            def run():
                with torch.no_grad():
                    model(inputs)
            return run
        timings = timing.interleaved({r: call(m) for r, m in pruned.items()}, rounds, fill_ms=BURST_MS,
                                     attempts=attempts)
        drop = timings.ms["drop"]
        for r in REDUCTIONS:
            report = pruned[r].report
            rows.append({"model": name, "img_size": img_size, "batch": batch, "reduction": r,
                         "ms": timings.ms[r], "cost_vs_drop": round(timings.ms[r] / drop - 1, 4),
                         "achieved_ratio": round(report.achieved_ratio, 4),
                         "pruned_gmacs": round(report.pruned_flops / 1e9, 4),
                         "others_cpu_share": timings.others_cpu_share})
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Merge cost ({result['date']})", "",
             f"{result['machine']}; torch {result['torch']}, {result['threads']} thread(s). Command: "
             f"`{result['command']}`. Best of interleaved rounds ({BURST_MS:.0f} ms bursts), ms per call; "
             "cost = time / drop's time - 1 (target <= 5%).", "",
             "| model | batch | reduction | ms | cost vs drop | FLOPs reduction | pruned GMACs | others' CPU share |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} {row['img_size']} | {row['batch']} | {row['reduction']} | {row['ms']:.2f} | "
                     f"{100 * row['cost_vs_drop']:+.1f}% | {row['achieved_ratio']:.3f} | {row['pruned_gmacs']:.4f} | "
                     f"{row['others_cpu_share']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViM-T at 112, batch 1, two rounds: checks the script")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--machine", default="2-core CPU VM, shared with other engineers' jobs (timings indicative)")
    args = parser.parse_args(argv)
    if args.quick:
        rows = rows_for("vim_t", 112, (1,), 2, 1, args.ratio)
    else:
        rows = [row for name, batches in zip(MODELS, ((1, 8), (1,)))
                for row in rows_for(name, 224, batches, args.rounds, 3, args.ratio)]
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": args.machine,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": "OMP_NUM_THREADS=1 python benchmarks/merge_cost.py" + (" --quick" if args.quick else ""),
              "rows": rows}
    if not args.quick:
        out = ROOT / "results"
        out.mkdir(exist_ok=True)
        (out / "merge_cost.json").write_text(json.dumps(result, indent=1))
        (out / "merge_cost.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
