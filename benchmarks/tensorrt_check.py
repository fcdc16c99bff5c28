"""TensorRT check: export a dense and a pruned model through torch-tensorrt, verify parity, time them.

Run on a machine with a CUDA GPU and torch-tensorrt (pip install 'mambaprune[tensorrt]')::

    python benchmarks/tensorrt_check.py --model vim_t --ratio 0.3 --batch 32 --dtype bf16

For the dense model (ratio 0) and the pruned one it: compiles with compile_pruned on the GPU, builds
the TensorRT module (mambaprune:: ops kept in PyTorch, everything else in TensorRT engines), checks
that TensorRT and PyTorch eager agree on a random batch, optionally saves the engine file
(--save-dir), and prints median latency / throughput of PyTorch eager and TensorRT for both, plus
the speedup of the pruned TensorRT model over the dense one next to the ideal (FLOPs ratio).
Exits with status 2 and a clear message when torch-tensorrt or a GPU is missing, 1 on a parity failure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}  # max abs diff of logits, relative to their scale


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vim_t", help="a mambaprune.models name (vim_t, vim_s, plainmamba_l1 ...)")
    parser.add_argument("--ratio", type=float, default=0.3, help="FLOPs fraction to remove for the pruned model")
    parser.add_argument("--schedule", default=None, help="'top' for ToP's schedule instead of --ratio")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch the engine accepts (default: batch)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--save-dir", default=None, help="also export <model>_{dense,pruned}.engine here")
    return parser.parse_args(argv)


def fail(message: str, status: int = 2):
    print(f"tensorrt_check: {message}", file=sys.stderr)
    sys.exit(status)


def time_it(fn, x, warmup: int, iters: int) -> float:
    import torch
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as err:
        fail(f"torch-tensorrt is not installed ({err}). Install it with: pip install 'mambaprune[tensorrt]' "
             "(needs a CUDA GPU and a matching TensorRT).")
    import torch
    if not torch.cuda.is_available():
        fail("no CUDA GPU is visible: TensorRT needs one.")

    from mambaprune import compile_pruned
    from mambaprune.models import create_model
    from mambaprune.deployment.tensorrt_backend import TensorRTModule, compile_tensorrt

    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size).eval().to(device="cuda", dtype=dtype)
    example = (torch.randn(2, 3, args.img_size, args.img_size, device="cuda", dtype=dtype),)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device="cuda", dtype=dtype)
    max_batch = args.max_batch or args.batch
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; torch-tensorrt {torch_tensorrt.__version__}")
    print(f"model {args.model} @ {args.img_size}, batch {args.batch}, {args.dtype}")

    rows, ok = {}, True
    variants = [("dense", dict(ratio=0.0)),
                ("pruned", dict(schedule="top") if args.schedule == "top" else dict(ratio=args.ratio))]
    for label, prune in variants:
        pruned = compile_pruned(model, example_inputs=example, **prune)
        trt_module, _ = compile_tensorrt(pruned, min_batch=1, opt_batch=args.batch, max_batch=max_batch)
        trt = TensorRTModule(trt_module)
        with torch.no_grad():
            expected, got = pruned(x).float(), trt(x).float()
        diff = (expected - got).abs().max().item()
        scale = expected.abs().max().item() or 1.0
        good = diff <= TOLERANCE[args.dtype] * max(1.0, scale)
        ok &= good
        eager_s = time_it(pruned, x, args.warmup, args.iters)
        trt_s = time_it(trt, x, args.warmup, args.iters)
        rows[label] = dict(flops=pruned.report.pruned_flops, eager=eager_s, trt=trt_s)
        print(f"{label:6s}: FLOPs/img {pruned.report.pruned_flops / 1e9:.3f} G | parity max|diff| {diff:.3g} "
              f"({'ok' if good else 'FAILED'}) | eager {eager_s * 1e3:.2f} ms | TensorRT {trt_s * 1e3:.2f} ms "
              f"({args.batch / trt_s:.0f} img/s)")
        if args.save_dir:
            path = pruned.export(os.path.join(args.save_dir, f"{args.model}_{label}.engine"),
                                 opt_batch=args.batch, max_batch=max_batch)
            print(f"        saved {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    dense, pruned_row = rows["dense"], rows["pruned"]
    print(f"speedup pruned vs dense: TensorRT {dense['trt'] / pruned_row['trt']:.2f}x, eager "
          f"{dense['eager'] / pruned_row['eager']:.2f}x, ideal (FLOPs) {dense['flops'] / pruned_row['flops']:.2f}x")
    if not ok:
        fail("TensorRT output differs from PyTorch beyond tolerance", status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
