"""How long capturing a scan written as a Python token loop takes (issue 26: L = 576 under 30 s).

torch.export unrolls the loop (L repetitions of the update and the readout) before
capture/token_loops.py can lift it into one scan, so capture time grows with L. For each written form
(transformers' `MambaMixer.slow_forward`: tests/official_zoo/hf_mamba.py; the hand-written per-step
form: tests/test_token_loops.py) one block at L tokens (images of 4 * sqrt(L) pixels, 4 x 4 patches,
random weights) is timed: `prepare` (capture + analysis + FLOPs; capture traces the loop module with
make_fx at two batches and exports it lifted: capture/loop_modules.py), then, separately, a bare
torch.export of the same model with a dynamic batch (what capture spent before loop_modules.py), the
lifting pass alone on that export, a torch.export with the batch fixed (what the dynamic batch costs), and
torch's own tracer alone (`make_fx`, pre-dispatch, the batch fixed, real tensors: the same aten ops
as the export without its bookkeeping; what a capture that traced the loop once that way would pay).

Writes benchmarks/results/loop_capture_time.{json,md}. Run: python benchmarks/loop_capture_time.py
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time
from datetime import datetime, timezone

import torch
from torch.fx.experimental.proxy_tensor import make_fx

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mambaprune.api import prepare  # noqa: E402
from mambaprune.capture.token_loops import lift_token_loops  # noqa: E402
from tests import official_zoo  # noqa: E402
from tests.test_token_loops import HandWrittenVim  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def models(size: int) -> dict:
    hf = official_zoo.family("hf_mamba")
    return {
        "transformers' slow path (hf_mamba: width 32, N 8)":
            hf.MambaForImageClassification(hf.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=1),
                                           img_size=size),
        "hand-written per-step loop (width 16, N 4)": HandWrittenVim(dim=16, depth=1, img_size=size,
                                                                     bidirectional=False),
    }


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def measure(name: str, model: torch.nn.Module, size: int) -> dict:
    model.eval()
    x = torch.randn(2, 3, size, size)
    prepared, prepare_s = timed(lambda: prepare(model, (x[:1],)))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program, export_s = timed(lambda: torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False))
    gm = program.module()
    (_, loops), lift_s = timed(lambda: lift_token_loops(gm))
    _, static_s = timed(lambda: torch.export.export(model, (x,), strict=False))
    with torch.no_grad():
        _, make_fx_s = timed(lambda: make_fx(model, tracing_mode="real", pre_dispatch=True)(x))
    return {"form": name, "tokens": prepared.analysis.token_length, "nodes_unrolled": len(gm.graph.nodes),
            "lifted": [str(loop) for loop in loops], "prepare_s": prepare_s, "export_dynamic_batch_s": export_s,
            "lift_s": lift_s, "export_static_batch_s": static_s, "make_fx_static_batch_s": make_fx_s}


def cpu_model() -> str:
    """The CPU's model name (machines differ between runs: the same command took 86 s on one 2-core VM and
    24 s on another)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown")


def markdown(rows: list, stamp: str, command: str) -> str:
    lines = [f"# Capture time of a scan written as a Python token loop ({stamp}, {platform.machine()} CPU ({cpu_model()}), "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
             f"Command: `{command}`. One block; `prepare` = capture (the loop module traced by make_fx at two "
             "batches, its loop lifted, then torch.export with a dynamic batch: capture/loop_modules.py) + analysis + "
             "FLOPs. The other columns time, alone, what a capture without loop_modules.py does (torch.export "
             "unrolling the loop, then the lifting) and two tracers with the batch fixed.", "",
             "| written form | tokens | graph nodes unrolled | prepare (s) | torch.export, dynamic batch (s) | "
             "lifting (s) | torch.export, batch fixed (s) | make_fx, batch fixed (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['tokens']} | {r['nodes_unrolled']} | {r['prepare_s']:.1f} | "
                     f"{r['export_dynamic_batch_s']:.1f} | {r['lift_s']:.1f} | {r['export_static_batch_s']:.1f} | "
                     f"{r['make_fx_static_batch_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=576, help="a square number of tokens (default 576)")
    args = parser.parse_args(argv)
    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        parser.error("--tokens must be a square number")
    rows = []
    with official_zoo.installed():
        for name, model in models(4 * side).items():
            torch.manual_seed(0)
            rows.append(measure(name, model, 4 * side))
            print(rows[-1], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/loop_capture_time.py" + (f" --tokens {args.tokens}" if args.tokens != 576 else "")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loop_capture_time.json").write_text(json.dumps({"when": stamp, "command": command, "rows": rows},
                                                           indent=1) + "\n")
    (OUT / "loop_capture_time.md").write_text(markdown(rows, stamp, command))
    return rows


if __name__ == "__main__":
    main()
