"""How long `prepare` (capture + analysis + FLOPs) and one `build` take on models at their real sizes.

Issue 26's target: capture + analysis of a 24-block ViM-S at 224 under 60 s on the project's 2-core CPU
machine. Each model is built with random weights and prepared `--repeats` times in this process (the
first run pays torch's one-time costs: the minimum is what a user compiling a second model waits);
the phases are timed separately: `capture` (torch.export of a private copy, scans routed by name and by
behaviour, slice fills rewritten), `analysis` (token facts, blocks, sites, FLOPs), and one `build` at
ratio 0.3 with both verification checks.

Writes benchmarks/results/capture_time.{json,md}. Run: python benchmarks/capture_time.py
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time
from datetime import datetime, timezone

import torch

from mambaprune.api import build, prepare
from mambaprune.models import create_model
from mambaprune.settings import PruneSettings

OUT = pathlib.Path(__file__).resolve().parent / "results"
MODELS = {   # name -> create_model arguments
    "vim_s (24 blocks, 224, L = 197)": ("vim_s", {}),
    "plainmamba_l1 (224, L = 196)": ("plainmamba_l1", {}),
    "vim2_t (24 Mamba-2 blocks, 224, L = 197)": ("vim2_t", {}),
}


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def measure(name: str, args: tuple, repeats: int) -> dict:
    model_name, overrides = args
    torch.manual_seed(0)
    model = create_model(model_name, **overrides).eval()
    x = torch.randn(1, 3, 224, 224)
    runs = []
    for _ in range(repeats):
        prepared, seconds = timed(lambda: prepare(model, (x,)))
        _, build_seconds = timed(lambda: build(prepared, PruneSettings(ratio=0.3)))
        runs.append({"prepare_s": seconds, "build_s": build_seconds})
    return {"model": name, "blocks": len(prepared.analysis.blocks), "tokens": prepared.analysis.token_length,
            "runs": runs, "prepare_min_s": min(r["prepare_s"] for r in runs),
            "build_min_s": min(r["build_s"] for r in runs)}


def markdown(rows: list, stamp: str, command: str) -> str:
    lines = [f"# Capture + analysis time ({stamp}, {platform.machine()} CPU, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads)", "", f"Command: `{command}`. `prepare` = capture (torch.export, "
             "scan routing, slice fills) + analysis + FLOPs; `build` = plan + rewrite + both verification checks "
             "at ratio 0.3. Every run listed; the first pays torch's one-time costs.", "",
             "| model | blocks | tokens | prepare (s), each run | build (s), each run |", "|---|---|---|---|---|"]
    for row in rows:
        prep = ", ".join(f"{r['prepare_s']:.1f}" for r in row["runs"])
        built = ", ".join(f"{r['build_s']:.1f}" for r in row["runs"])
        lines.append(f"| {row['model']} | {row['blocks']} | {row['tokens']} | {prep} | {built} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="*", help="a subset of the model names (default: all)")
    args = parser.parse_args(argv)
    rows = []
    for name, model_args in MODELS.items():
        if args.models and not any(m in name for m in args.models):
            continue
        rows.append(measure(name, model_args, args.repeats))
        print(rows[-1]["model"], [round(r["prepare_s"], 1) for r in rows[-1]["runs"]], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/capture_time.py" + (f" --repeats {args.repeats}" if args.repeats != 2 else "") + \
              (" --models " + " ".join(args.models) if args.models else "")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "capture_time.json").write_text(json.dumps({"when": stamp, "command": command, "rows": rows}, indent=1) + "\n")
    (OUT / "capture_time.md").write_text(markdown(rows, stamp, command))
    return rows


if __name__ == "__main__":
    main()
