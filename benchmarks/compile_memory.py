"""Resident memory over repeated compiles (issue 19): does a long-running process that compiles many
models grow?

A tiny ViM is compiled `--auto` times with schedule="auto" (two calibration batches), then `--plain`
times with the defaults; after every call the result is dropped and `gc.collect()` runs, and the
process's resident set size (/proc/self/statm, Linux) is recorded. Writes
benchmarks/results/compile_memory.{json,md}.

    python benchmarks/compile_memory.py --auto 10 --plain 50
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mambaprune import compile_pruned, create_model

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def series(compile_once, count: int) -> list:
    """RSS (MiB) after each of `count` compiles."""
    values = []
    for _ in range(count):
        compile_once()
        gc.collect()
        values.append(round(rss_mib(), 2))
    return values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--auto", type=int, default=10)
    parser.add_argument("--plain", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10).eval()
    calibration = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    start = time.perf_counter()
    auto = series(lambda: compile_pruned(model, 0.3, schedule="auto", calibration=calibration), args.auto)
    plain = series(lambda: compile_pruned(model, 0.3), args.plain)
    payload = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
               "command": "python benchmarks/compile_memory.py --auto %d --plain %d" % (args.auto, args.plain),
               "rss_mib_after_auto": auto, "rss_mib_after_plain": plain, "wall_s": round(time.perf_counter() - start, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile_memory.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Resident memory over repeated compiles ({payload['date']}, torch {payload['torch']})", "",
             f"Command: `{payload['command']}` ({payload['wall_s']} s). RSS after each compile and gc.collect().", "",
             "| compiles | first | after 1/4 of them | after half | last | last - first |", "|---|---|---|---|---|---|"]
    for name, values in (("schedule='auto'", auto), ("plain", plain)):
        if values:
            lines.append(f"| {len(values)} {name} | {values[0]} | {values[len(values) // 4]} | "
                         f"{values[len(values) // 2]} | {values[-1]} | {values[-1] - values[0]:+.2f} MiB |")
    (RESULTS / "compile_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
