"""CPU micro-benchmark of the selective scan's implementations and the alignment ops, per call.

Every implementation runs through the public op (``selective_scan`` with MAMBAPRUNE_SCAN_IMPL set),
the way a model calls it: ViM's layout (u, delta, z: transposed views of (batch, L, D) tensors; B,
C: transposed views of (batch, L, N)), D, z, delta_bias and softplus. Calls are interleaved round
robin (one ~25 ms burst of calls of each implementation per round) and the best call is kept, so
a noisy neighbour slows every implementation alike. Also: the error of each implementation against the
float64 reference, the reference-vs-sequential crossover that picks the fallback when the C++
kernels cannot be built, the alignment ops before (their composite definitions) and after (the
ops), and the C++ kernels' build time in a fresh TORCH_EXTENSIONS_DIR.

    python benchmarks/scan_cpu.py                # writes benchmarks/results/scan_cpu.json and .md
    python benchmarks/scan_cpu.py --quick        # two rounds, small shapes: checks the script
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune.runtime import cpu_kernels_status, path_order, pos_conv1d, pos_conv2d, selective_scan  # noqa: E402
from mambaprune.runtime.scan_reference import selective_scan_reference  # noqa: E402
from mambaprune.runtime import timing  # noqa: E402
from mambaprune.runtime.cpu_kernels import load_cpu_kernels  # noqa: E402
from mambaprune.runtime.token_ops import (  # noqa: E402
    path_order_by_argsort,
    path_order_composite,
    pos_conv1d_composite,
    pos_conv2d_composite,
)

MODELS = {"vim_t": 384, "vim_s": 768}  # the scan's D: ViM-T / ViM-S embed dim 192 / 384, expand 2
LENGTH, DSTATE = 197, 16
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OTHERS_MAX, ATTEMPTS, CONTENTION_WAIT_S = 0.1, 8, 20.0
BURST_MS = 25.0  # per call and round: a 1 ms call is timed ~25 times, a 50 ms one once


@contextlib.contextmanager
def forced(impl: str):
    previous = os.environ.get("MAMBAPRUNE_SCAN_IMPL")
    os.environ["MAMBAPRUNE_SCAN_IMPL"] = impl
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MAMBAPRUNE_SCAN_IMPL"]
        else:
            os.environ["MAMBAPRUNE_SCAN_IMPL"] = previous


def scan_args(batch: int, dim: int, length: int = LENGTH, dstate: int = DSTATE, seed: int = 0) -> dict:
    """ViM-shaped inputs: (batch, L, D) activations seen as (batch, D, L) views, as its mixer passes them."""
    g = torch.Generator().manual_seed(seed)

    def tokens_last(channels):
        return torch.randn(batch, length, channels, generator=g).transpose(1, 2)

    return dict(u=tokens_last(dim), delta=tokens_last(dim) * 0.5 - 1.0,
                A=-torch.exp(torch.rand(dim, dstate, generator=g) * 2.5), B=tokens_last(dstate),
                C=tokens_last(dstate), D=torch.randn(dim, generator=g), z=tokens_last(dim),
                delta_bias=torch.randn(dim, generator=g) * 0.3, delta_softplus=True)


def interleaved(calls: dict, rounds: int) -> dict:
    """Best wall time in ms of each call (runtime.timing.interleaved: one ~BURST_MS burst of each per
    round after a warm-up round; a block during which other processes took more than OTHERS_MAX of
    the CPU is measured again, up to ATTEMPTS times): on a shared 2-core machine one neighbour slows
    a 2-thread op several-fold. The share others took is kept with the times."""
    timings = timing.interleaved(calls, rounds, fill_ms=BURST_MS, attempts=ATTEMPTS, others_max=OTHERS_MAX,
                                 wait_s=CONTENTION_WAIT_S)
    return dict(timings.ms, others_cpu_share=timings.others_cpu_share)


def scan_impls() -> list:
    return ["reference", "sequential"] + (["cpp"] if cpu_kernels_status().available else [])


def forward_call(impl: str, args: dict):
    def call():
        with forced(impl), torch.no_grad():
            selective_scan(**args)
    return call


def training_call(impl: str, args: dict, grad_out: torch.Tensor):
    leaves = {k: v.detach().clone().requires_grad_() if k in GRAD_NAMES else v for k, v in args.items()}

    def call():
        with forced(impl):
            selective_scan(**leaves).backward(grad_out)
    return call


def max_errors(args: dict) -> dict:
    """Each implementation's largest absolute error against the float64 reference, and relative to max |y|."""
    exact = selective_scan_reference(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    scale = float(exact.abs().max())
    errors = {}
    for impl in scan_impls():
        with forced(impl), torch.no_grad():
            err = float((selective_scan(**args).double() - exact).abs().max())
        errors[impl] = {"abs": err, "rel": err / scale}
    return errors


def scan_rows(batches, rounds: int) -> list:
    rows = []
    for model, dim in MODELS.items():
        for batch in batches:
            args = scan_args(batch, dim)
            grad_out = torch.randn(batch, dim, LENGTH)
            forward = interleaved({impl: forward_call(impl, args) for impl in scan_impls()}, rounds)
            training = interleaved({impl: training_call(impl, args, grad_out) for impl in scan_impls()},
                                   max(1, rounds // 2))
            rows.append(dict(model=model, batch=batch, dim=dim, length=LENGTH, dstate=DSTATE, forward_ms=forward,
                             forward_backward_ms=training, max_error=max_errors(args)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def crossover_rows(shapes, rounds: int) -> list:
    """Forward ms of every implementation at small states: where the PyTorch fallback switches."""
    rows = []
    for batch, dim, length in shapes:
        args = scan_args(batch, dim, length)
        times = interleaved({impl: forward_call(impl, args) for impl in scan_impls()}, rounds)
        rows.append(dict(batch=batch, dim=dim, length=length, state=batch * dim * DSTATE, forward_ms=times))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def alignment_inputs(batch: int, kept: int, channels: int = 384, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def positions(length):
        return torch.stack([torch.randperm(length, generator=g)[:kept].sort().values for _ in range(batch)])

    return dict(x1=torch.randn(batch, kept, channels, generator=g).transpose(1, 2), w1=torch.randn(channels, 1, 4),
                pos1=positions(LENGTH), x2=torch.randn(batch, kept, channels, generator=g),
                w3=torch.randn(channels, 1, 3, 3), w7=torch.randn(channels, 1, 7, 7),
                bias=torch.randn(channels), pos2=positions(196), path=torch.arange(LENGTH).flip(0))


def alignment_calls(a: dict) -> dict:
    """(op, formulation) -> forward call; (op, formulation, 'fwd+bwd') -> forward and backward call.

    Formulations: 'composite' (the definition, called directly), 'body' (what the op runs: the C++
    kernel, called directly), 'op' (the public function: argument checks + custom-op dispatch + body).
    """
    convs = {
        "pos_conv1d W=4 left=3": lambda f: f(a["x1"], a["w1"], a["bias"], a["pos1"], 3),
        "pos_conv2d 3x3 on 14x14": lambda f: f(a["x2"], a["w3"], a["bias"], a["pos2"], 14, 14, 1),
        "pos_conv2d 7x7 on 14x14": lambda f: f(a["x2"], a["w7"], a["bias"], a["pos2"], 14, 14, 3),
    }
    formulations = {"pos_conv1d": (pos_conv1d_composite, pos_conv1d), "pos_conv2d": (pos_conv2d_composite, pos_conv2d)}
    calls = {}
    for label, apply in convs.items():
        composite, op = formulations[label.split()[0]]
        for name, f in (("composite", composite), ("op", op)):
            calls[(label, name)] = lambda apply=apply, f=f: _no_grad(lambda: apply(f))
            calls[(label, name, "fwd+bwd")] = lambda apply=apply, f=f: _with_grad(apply, f, a)
    kernels = load_cpu_kernels()
    if kernels is not None:
        calls[("pos_conv1d W=4 left=3", "body")] = lambda: kernels.pos_conv1d_forward(a["x1"], a["w1"], a["bias"],
                                                                                       a["pos1"], 3)
        for label, weight, padding in (("3x3", "w3", 1), ("7x7", "w7", 3)):
            calls[(f"pos_conv2d {label} on 14x14", "body")] = lambda weight=weight, padding=padding: (
                kernels.pos_conv2d_forward(a["x2"], a[weight], a["bias"], a["pos2"], 14, 14, padding))
    calls[("path_order", "composite")] = lambda: path_order_composite(a["path"], a["pos1"])
    calls[("path_order", "body")] = lambda: path_order_by_argsort(a["path"], a["pos1"])
    calls[("path_order", "op")] = lambda: path_order(a["path"], a["pos1"])
    return calls


def _no_grad(call):
    with torch.no_grad():
        return call()


def _with_grad(apply, f, a):
    for key in ("x1", "x2", "w1", "w3", "w7", "bias"):
        a[key].requires_grad_(True)
    apply(f).sum().backward()
    for key in ("x1", "x2", "w1", "w3", "w7", "bias"):
        a[key].grad = None
        a[key].requires_grad_(False)


def alignment_rows(batches, kept_counts, rounds: int) -> list:
    rows = []
    for batch in batches:
        for kept in kept_counts:
            times = interleaved(alignment_calls(alignment_inputs(batch, kept)), rounds)
            others = times.pop("others_cpu_share")
            for key, ms in times.items():
                rows.append(dict(op=key[0], formulation=key[1], step="fwd+bwd" if len(key) == 3 else "forward",
                                 batch=batch, kept=kept, ms=ms, others_cpu_share=others))
            print(json.dumps([r for r in rows if r["batch"] == batch and r["kept"] == kept]), flush=True)
    return rows


BUILD_SCRIPT = "from mambaprune.runtime import cpu_kernels_status as s; import json; print(json.dumps(s().__dict__))"


def fresh_build_seconds() -> dict:
    """Wall time of building the C++ kernels from scratch (an empty TORCH_EXTENSIONS_DIR), in a subprocess."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache, PYTHONPATH=str(ROOT.parent))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    status = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else {}
    return dict(process_seconds=round(wall, 1), build_seconds=round(status.get("seconds") or 0.0, 1),
                available=status.get("available", False), detail=status.get("detail", result.stderr[-300:]))


def _cell(times: dict, impl: str) -> str:
    return f"{times[impl]:.3f}" if impl in times else "-"


def largest_others_share(result: dict) -> float:
    shares = [r[key]["others_cpu_share"] for r in result["scan"] for key in ("forward_ms", "forward_backward_ms")]
    shares += [r["forward_ms"]["others_cpu_share"] for r in result["crossover"]]
    shares += [r["others_cpu_share"] for r in result["alignment"]]
    return max(shares)


def markdown(result: dict) -> str:
    impls = ["reference", "sequential", "cpp"]
    lines = [f"# Selective scan and alignment ops on the CPU ({result['date']})", "",
             f"Machine: {result['machine']}.  ", f"Command: `{result['command']}`.  ",
             "Best call of interleaved rounds (a ~25 ms burst of back-to-back calls per op and round: warm caches), ms per call, through the public ops (validation and dispatch included). "
             f"Blocks measured while other processes took over {OTHERS_MAX:.0%} of the CPU were repeated; the "
             f"largest share they took during a kept block: {largest_others_share(result):.1%}.",
             "", f"C++ kernels: {result['kernels']['detail']}; fresh build {result['build']['build_seconds']} s "
             f"({result['build']['process_seconds']} s for the whole process).", "",
             "## Scan, ViM layout (transposed (batch, L, D) views), D + z + delta_bias + softplus, L=197, N=16", "",
             "| model | batch | D | " + " | ".join(f"{i} fwd" for i in impls) + " | "
             + " | ".join(f"{i} fwd+bwd" for i in impls) + " | max rel. error (" + ", ".join(impls) + ") |",
             "|" + "---|" * (3 + 2 * len(impls) + 1)]
    for r in result["scan"]:
        errors = ", ".join(f"{r['max_error'][i]['rel']:.1e}" if i in r["max_error"] else "-" for i in impls)
        lines.append(f"| {r['model']} | {r['batch']} | {r['dim']} | "
                     + " | ".join(_cell(r["forward_ms"], i) for i in impls) + " | "
                     + " | ".join(_cell(r["forward_backward_ms"], i) for i in impls) + f" | {errors} |")
    lines += ["", "Max abs. error against the float64 reference: "
              + "; ".join(f"{r['model']} batch {r['batch']}: " + ", ".join(f"{i} {e['abs']:.1e}" for i, e in
                                                                        r["max_error"].items())
                          for r in result["scan"]), "",
              "## Crossover at small states (forward ms)", "",
              "| batch | D | L | batch*D*N | " + " | ".join(impls) + " |", "|" + "---|" * (4 + len(impls))]
    for r in result["crossover"]:
        lines.append(f"| {r['batch']} | {r['dim']} | {r['length']} | {r['state']} | "
                     + " | ".join(_cell(r["forward_ms"], i) for i in impls) + " |")
    lines += ["", "## Alignment ops, C=384 (before: the composite definition; after: the op)", "",
              "composite: the definition called directly (what the op ran before); body: what the op runs now "
              "(the C++ kernel, or path_order's argsort form), called directly; op: the public function "
              "(argument checks and custom-op dispatch around the body). Speed-up: composite / op.", "",
              "| op | step | batch | K | composite ms | body ms | op ms | speed-up |", "|---|---|---|---|---|---|---|---|"]
    by_key = {}
    for r in result["alignment"]:
        by_key.setdefault((r["op"], r["step"], r["batch"], r["kept"]), {})[r["formulation"]] = r["ms"]
    for (op, step, batch, kept), t in by_key.items():
        body = f"{t['body']:.3f}" if "body" in t else "-"
        lines.append(f"| {op} | {step} | {batch} | {kept} | {t['composite']:.3f} | {body} | {t['op']:.3f} | "
                     f"{t['composite'] / t['op']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds, batch 1 only: checks the script")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scan_cpu")
    args = parser.parse_args()
    rounds, batches = (2, (1,)) if args.quick else (args.rounds, (1, 8))
    result = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=timing.cpu_description(),
                  command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                  kernels=cpu_kernels_status().__dict__, build=fresh_build_seconds())
    print(json.dumps(result), flush=True)
    result["scan"] = scan_rows(batches, rounds)
    small = [(1, 8, 16), (2, 6, 37), (1, 16, 197), (1, 64, 197), (2, 128, 197), (1, 384, 197), (1, 384, 32)]
    result["crossover"] = crossover_rows(small[:2] if args.quick else small, rounds)
    result["alignment"] = alignment_rows(batches, (157,) if args.quick else (157, 125, 99), rounds * 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
