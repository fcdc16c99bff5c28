"""CPU micro-benchmark of the SSD (Mamba-2) scan against the Mamba-1 selective scan, per state update.

Equal shapes: batch, L tokens, D = heads * headdim channels, N states; both with D, z, dt bias and
softplus, both in their models' layouts (Mamba-1: transposed (batch, L, D) views as ViM passes them;
SSD: views of one in_proj output as mamba_ssm's Mamba2 passes them). Rows:

- kernel forward: ``ssd_scan_cpp`` against ``selective_scan_cpp`` (the C++ kernels, no op dispatch);
  ns per state update = time / (batch * L * D * N), the ratio SSD / Mamba-1 (issue 28: within 2x);
- op forward: the public ``ssd_scan`` / ``selective_scan`` (validation and dispatch included);
- op forward + backward: the SSD op (its C++ analytic backward) and the Mamba-1 op (its C++ backward);
  at batch 1 also the SSD op's other backwards: autograd through the direct token loop
  (``MAMBAPRUNE_SCAN_IMPL=reference``) and through the equivalent Mamba-1 scan's pure-PyTorch token
  loop (``sequential``, the fallback without a C++ compiler).

Calls are interleaved round robin (runtime.timing), the best kept; one thread.

    python benchmarks/ssd_cpu.py            # writes benchmarks/results/ssd_cpu.json and .md
    python benchmarks/ssd_cpu.py --quick    # two rounds, one shape: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune.runtime import cpu_kernels_status, selective_scan, ssd_scan, timing  # noqa: E402
from mambaprune.runtime.scan_cpp import selective_scan_cpp  # noqa: E402
from mambaprune.runtime.ssd_cpp import ssd_scan_cpp  # noqa: E402

# (batch, L, heads, headdim, N): ViM-T's scan width (D = 384) at L = 197, N = 16 as Mamba-1 and 64 as Mamba-2.
SHAPES = [(1, 197, 6, 64, 16), (8, 197, 6, 64, 16), (1, 197, 6, 64, 64), (8, 197, 6, 64, 64)]
SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
MAMBA1_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
BURST_MS, ATTEMPTS, OTHERS_MAX, WAIT_S = 25.0, 6, 0.1, 20.0


def ssd_args(batch, length, heads, headdim, dstate, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inner = heads * headdim
    projected = torch.randn(batch, length, 2 * inner + 2 * dstate + heads, generator=g)
    z, x, B, C, dt = projected.split([inner, inner, dstate, dstate, heads], -1)
    return dict(x=x.unflatten(-1, (heads, headdim)), dt=dt * 0.5 - 1.0, A=-torch.exp(torch.rand(heads, generator=g)),
                B=B.unflatten(-1, (1, dstate)), C=C.unflatten(-1, (1, dstate)), D=torch.randn(heads, generator=g),
                z=z.unflatten(-1, (heads, headdim)), dt_bias=torch.randn(heads, generator=g) * 0.3, dt_softplus=True)


def mamba1_args(batch, length, dim, dstate, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def tokens_last(channels):
        return torch.randn(batch, length, channels, generator=g).transpose(1, 2)

    return dict(u=tokens_last(dim), delta=tokens_last(dim) * 0.5 - 1.0,
                A=-torch.exp(torch.rand(dim, dstate, generator=g) * 2.5), B=tokens_last(dstate), C=tokens_last(dstate),
                D=torch.randn(dim, generator=g), z=tokens_last(dim), delta_bias=torch.randn(dim, generator=g) * 0.3,
                delta_softplus=True)


def no_grad(fn, args):
    def call():
        with torch.no_grad():
            fn(**args)
    return call


def training(fn, args, names, impl=None):
    leaves = {k: v.detach().clone().requires_grad_() if k in names else v for k, v in args.items()}
    targets = [leaves[k] for k in names]

    def call():
        previous = os.environ.get("MAMBAPRUNE_SCAN_IMPL")
        if impl:
            os.environ["MAMBAPRUNE_SCAN_IMPL"] = impl
        try:
            torch.autograd.grad(fn(**leaves).square().sum(), targets)  # no accumulation into .grad
        finally:
            if impl:
                os.environ.pop("MAMBAPRUNE_SCAN_IMPL") if previous is None else os.environ.update(
                    MAMBAPRUNE_SCAN_IMPL=previous)
    return call


def measure(calls: dict, rounds: int) -> dict:
    t = timing.interleaved(calls, rounds, fill_ms=BURST_MS, attempts=ATTEMPTS, others_max=OTHERS_MAX, wait_s=WAIT_S)
    return dict(t.ms, others_cpu_share=t.others_cpu_share)


def row(shape, rounds: int, with_token_loop: bool) -> dict:
    batch, length, heads, headdim, dstate = shape
    dim = heads * headdim
    ssd, mamba1 = ssd_args(*shape), mamba1_args(batch, length, dim, dstate)
    updates = batch * length * dim * dstate
    kernel = measure({"ssd": no_grad(ssd_scan_cpp, ssd), "mamba1": no_grad(selective_scan_cpp, mamba1)}, rounds)
    op = measure({"ssd": no_grad(ssd_scan, ssd), "mamba1": no_grad(selective_scan, mamba1)}, rounds)
    train_calls = {"ssd": training(ssd_scan, ssd, SSD_GRADS), "mamba1": training(selective_scan, mamba1, MAMBA1_GRADS)}
    if with_token_loop:
        train_calls["ssd_token_loop_autograd"] = training(ssd_scan, ssd, SSD_GRADS, impl="reference")
        train_calls["ssd_via_mamba1_sequential"] = training(ssd_scan, ssd, SSD_GRADS, impl="sequential")
    train = measure(train_calls, max(1, rounds // 2))
    return dict(batch=batch, length=length, heads=heads, headdim=headdim, dim=dim, dstate=dstate,
                state_updates=updates, kernel_forward_ms=kernel, op_forward_ms=op, forward_backward_ms=train,
                kernel_ns_per_update={k: round(kernel[k] * 1e6 / updates, 4) for k in ("ssd", "mamba1")},
                kernel_ratio_ssd_over_mamba1=round(kernel["ssd"] / kernel["mamba1"], 3))


def markdown(result: dict) -> str:
    shares = [r[k]["others_cpu_share"] for r in result["rows"] for k in ("kernel_forward_ms", "op_forward_ms",
                                                                          "forward_backward_ms")]
    lines = [f"# SSD (Mamba-2) scan vs Mamba-1 selective scan on the CPU ({result['date']})", "",
             f"Machine: {result['machine']} (shared with other jobs: the largest share of its CPU time others "
             f"took during a kept block was {max(shares):.1%}).  ", f"Command: `{result['command']}`.  ",
             f"C++ kernels: {result['kernels']['detail']}.", "",
             "Best call of interleaved rounds, ms. Both scans with D, z, dt bias and softplus, D = heads * headdim "
             "channels, in their models' layouts. ns/update = kernel time / (batch * L * D * N).", "",
             "| batch | L | heads x headdim | N | SSD kernel | Mamba-1 kernel | ns/update SSD / Mamba-1 | SSD / Mamba-1 "
             "| SSD op | Mamba-1 op | SSD fwd+bwd | Mamba-1 fwd+bwd | SSD fwd+bwd: token-loop autograd "
             "| SSD fwd+bwd: via Mamba-1 sequential |", "|" + "---|" * 14]
    for r in result["rows"]:
        k, o, t, ns = r["kernel_forward_ms"], r["op_forward_ms"], r["forward_backward_ms"], r["kernel_ns_per_update"]
        loop, via = (f"{t[k]:.2f}" if k in t else "-" for k in ("ssd_token_loop_autograd", "ssd_via_mamba1_sequential"))
        lines.append(f"| {r['batch']} | {r['length']} | {r['heads']} x {r['headdim']} | {r['dstate']} | {k['ssd']:.3f} "
                     f"| {k['mamba1']:.3f} | {ns['ssd']:.3f} / {ns['mamba1']:.3f} | "
                     f"{r['kernel_ratio_ssd_over_mamba1']:.2f}x | {o['ssd']:.3f} | {o['mamba1']:.3f} | "
                     f"{t['ssd']:.2f} | {t['mamba1']:.2f} | {loop} | {via} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds, one shape: checks the script")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ssd_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not cpu_kernels_status().available:
        raise SystemExit(f"the C++ kernels are unavailable: {cpu_kernels_status().detail}")
    rounds, shapes = (2, SHAPES[:1]) if args.quick else (args.rounds, SHAPES)
    result = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=timing.cpu_description(),
                  command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                  kernels=cpu_kernels_status().__dict__, rows=[])
    for shape in shapes:
        result["rows"].append(row(shape, rounds, with_token_loop=shape[0] == 1))
        print(json.dumps(result["rows"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
