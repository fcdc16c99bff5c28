"""Command line: `python -m mambaprune demo` (or the `mambaprune` entry point)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def demo(args) -> None:
    """Print the model zoo with parameters and FLOPs, then prune ViM-T and print the report."""
    from . import compile_pruned
    from .compiler.flops import count_flops
    from .models import create_model, list_models

    torch.manual_seed(0)
    image = torch.randn(1, 3, args.img_size, args.img_size)
    print(f"Model zoo at {args.img_size}x{args.img_size} (no pretrained weights offline: random init)")
    print(f"{'model':<16}{'params (M)':>12}{'GFLOPs':>10}")
    for name in list_models():
        model = create_model(name, img_size=args.img_size).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        flops = count_flops(model, (image,)).total / 1e9
        print(f"{name:<16}{params:>12.2f}{flops:>10.3f}")
    model = create_model(args.model, img_size=args.img_size).eval()
    start = time.perf_counter()
    fast = compile_pruned(model, ratio=args.ratio, example_inputs=(image,))
    print(f"\ncompile_pruned({args.model}, ratio={args.ratio}) in {time.perf_counter() - start:.1f} s")
    print(fast.report)
    batch = torch.randn(4, 3, args.img_size, args.img_size)
    with torch.no_grad():
        dense, pruned = model(batch), fast(batch)
    agree = (dense.argmax(-1) == pruned.argmax(-1)).float().mean().item()
    print(f"\nrandom-weight sanity check on 4 images: max |logit diff| "
          f"{(dense - pruned).abs().max().item():.4f}, top-1 agreement {agree:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mambaprune", description="Token pruning for vision state-space models")
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="print the model zoo and prune ViM-T")
    run_demo.add_argument("--model", default="vim_t")
    run_demo.add_argument("--ratio", type=float, default=0.3)
    run_demo.add_argument("--img-size", type=int, default=224)
    run_demo.set_defaults(run=demo)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, ImportError) as err:
        print(f"mambaprune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
