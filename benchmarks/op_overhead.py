"""What one call of each mambaprune op costs on top of its kernel, and what the custom_op decorator would add.

    python benchmarks/op_overhead.py              # ViM-T shapes, batch 1 and 8
    python benchmarks/op_overhead.py --quick      # two rounds, batch 1: checks the script

For every op a pruned ViM calls per block (pos_conv1d, selective_scan, path_order), three ways of
making the same call, timed round robin in one block (mambaprune.runtime.timing):
- body: what the op runs (the C++ kernel, or path_order's argsort form), called directly;
- op: ``torch.ops.mambaprune.<op>.default``, as a captured graph calls it (dispatcher, autograd
  kernel, the op's Python kernel around the body), defined by runtime/op_library.py;
- custom_op: the same Python kernel and autograd defined with ``torch.library.custom_op`` instead (how
  the ops were defined before), in a namespace of this script.
Overhead = op - body. The inputs are ViM-T's at a keep rate of 0.7 (138 of 197 tokens for the conv,
all 197 for the scan); the conv input is a contiguous (batch, C, K) tensor, the layout the official
mixers pass. Writes benchmarks/results/op_overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune.runtime import cpu_kernels_status, timing, token_ops  # noqa: E402

SCAN = sys.modules["mambaprune.runtime.selective_scan"]  # the module (the package exports a function of that name)
E, N, L, KEPT = 384, 16, 197, 138


def inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    pos = torch.stack([torch.randperm(L, generator=g)[:KEPT].sort().values for _ in range(batch)])
    return dict(conv=(randn(batch, E, KEPT), randn(E, 1, 4), randn(E), pos, 3),
                scan=(randn(batch, L, E).transpose(1, 2), randn(batch, L, E).transpose(1, 2), -torch.rand(E, N, generator=g),
                      randn(batch, N, L), randn(batch, N, L), randn(E), randn(batch, L, E).transpose(1, 2), randn(E), True,
                      None),
                order=(torch.arange(L).flip(0), pos))


def custom_op_twins() -> dict:
    """The ops' own kernels and autograd, defined with torch.library.custom_op (namespace mambaprune_bench)."""
    conv = torch.library.custom_op("mambaprune_bench::pos_conv1d", token_ops._pos_conv1d_kernel, mutates_args=(),
                                   schema="(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int left) -> Tensor")
    conv.register_autograd(token_ops._pos_conv1d_backward, setup_context=token_ops._pos_conv1d_setup_context)
    scan = torch.library.custom_op(
        "mambaprune_bench::selective_scan", SCAN._selective_scan_kernel, mutates_args=(),
        schema="(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D=None, Tensor? z=None, "
               "Tensor? delta_bias=None, bool delta_softplus=False, Tensor? gap=None) -> Tensor")
    scan.register_autograd(SCAN._backward, setup_context=SCAN._setup_context)
    order = torch.library.custom_op("mambaprune_bench::path_order", token_ops.path_order_by_argsort, mutates_args=(),
                                    schema="(Tensor path, Tensor pos) -> Tensor")
    return dict(conv=conv, scan=scan, order=order)


@functools.lru_cache(maxsize=None)
def custom_op_twins_once() -> dict:
    """`custom_op_twins`, defined once per process (an op name can be defined only once)."""
    return custom_op_twins()


def bodies() -> dict:
    from mambaprune.runtime.scan_cpp import selective_scan_cpp

    return dict(conv=token_ops._pos_conv1d_kernel, scan=selective_scan_cpp, order=token_ops.path_order_by_argsort)


OPS = dict(conv=("pos_conv1d", torch.ops.mambaprune.pos_conv1d.default),
           scan=("selective_scan", torch.ops.mambaprune.selective_scan.default),
           order=("path_order", torch.ops.mambaprune.path_order.default))


def rows_for(batch: int, rounds: int, twins: dict, attempts: int) -> list:
    args = inputs(batch)
    calls = {}
    for key, (_, op) in OPS.items():
        for way, fn in (("body", bodies()[key]), ("op", op), ("custom_op", twins[key])):
            calls[(key, way)] = lambda fn=fn, a=args[key]: fn(*a)
    with torch.no_grad():
        times = timing.interleaved(calls, rounds, fill_ms=25.0, attempts=attempts)
    ms, others = times.ms, times.others_cpu_share
    return [dict(op=name, batch=batch, body_us=round(ms[(key, "body")] * 1e3, 1), op_us=round(ms[(key, "op")] * 1e3, 1),
                 custom_op_us=round(ms[(key, "custom_op")] * 1e3, 1), others_cpu_share=others)
            for key, (name, _) in OPS.items()]


def markdown(result: dict) -> str:
    lines = [f"# Per-call cost of the mambaprune ops on the CPU ({result['date']})", "",
             f"Machine: {result['machine']}.  ", f"Command: `{result['command']}`.  ",
             f"C++ kernels: {result['kernels']}. Best call of interleaved rounds (25 ms bursts), microseconds per call, "
             "no grad. body: the kernel called directly; op: torch.ops.mambaprune.<op> as graphs call it; custom_op: the "
             "same kernel and autograd defined with torch.library.custom_op. Inputs: ViM-T shapes (E=384, N=16, L=197; "
             "the conv on 138 kept tokens, contiguous (batch, C, K)).", "",
             "| op | batch | body us | op us | custom_op us | op overhead us | custom_op overhead us | others' CPU share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['batch']} | {r['body_us']} | {r['op_us']} | {r['custom_op_us']} | "
                     f"{r['op_us'] - r['body_us']:.1f} | {r['custom_op_us'] - r['body_us']:.1f} | {r['others_cpu_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds, batch 1 only: checks the script")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "op_overhead")
    args = parser.parse_args(argv)
    rounds, batches = (2, (1,)) if args.quick else (args.rounds, (1, 8))
    twins = custom_op_twins_once()
    # a block run while others took over 10% of the CPU is measured again (twice at most, 20 s apart)
    rows = [row for batch in batches for row in rows_for(batch, rounds, twins, 1 if args.quick else 3)]
    result = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=timing.cpu_description(),
                  command="python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
                  kernels=cpu_kernels_status().detail, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
