"""FLOPs reduction of the authors' own model code at 224 x 224, pruned by compile_pruned.

The official PlainMamba (L1, L3: tests/official_plainmamba.py, the mmcls classes as their repository
writes them) and the official ViM (T, S: tests/official_vim.py), with random weights, on the
mamba_ssm stand-in of the tests (plain-PyTorch references of the CUDA kernels, which mambaprune
routes to its own scan). Each model is captured once and built at every ratio with the default
schedule and alignment; the FLOPs are MACs per image measured on the dense and the pruned graph.

Writes benchmarks/results/official_flops.{json,md}. Run: python benchmarks/official_flops.py
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from mamba_ssm_stub import installed  # noqa: E402

from mambaprune.api import build, prepare  # noqa: E402
from mambaprune.settings import PruneSettings  # noqa: E402

RATIOS = (0.3, 0.4)


def official_models():
    """name -> builder of the official model at 224 (imported with the stand-in installed)."""
    import official_plainmamba
    import official_vim

    def plainmamba(arch):
        return lambda: official_plainmamba.ImageClassifier({"arch": arch, "img_size": 224}, 1000)

    return {
        "PlainMamba-L1 (official)": plainmamba("L1"),
        "PlainMamba-L3 (official)": plainmamba("L3"),
        "ViM-T (official)": lambda: official_vim.VisionMamba(embed_dim=192),
        "ViM-S (official)": lambda: official_vim.VisionMamba(embed_dim=384),
    }


def measure(name: str, make, ratios) -> dict:
    torch.manual_seed(0)
    model = make().eval()
    start = time.perf_counter()
    prepared = prepare(model, (torch.randn(1, 3, 224, 224),))
    row = {"model": name, "dense_gmacs": sum(prepared.flops.values()) / 1e9, "ratios": {}}
    for ratio in ratios:
        report = build(prepared, PruneSettings(ratio=ratio, verify=False)).report
        row["ratios"][str(ratio)] = {"pruned_gmacs": report.pruned_flops / 1e9, "reduction": report.achieved_ratio,
                                     "sites": {str(k): v for k, v in report.sites.items()}}
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(rows: list, ratios) -> str:
    head = "| model | dense GMACs | " + " | ".join(f"ratio {r}: GMACs (reduction), sites" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (2 + len(ratios))]
    for row in rows:
        cells = [f"{row['ratios'][str(r)]['pruned_gmacs']:.3f} ({row['ratios'][str(r)]['reduction']:.3f}), "
                 + ", ".join(f"{k}:{v}" for k, v in row["ratios"][str(r)]["sites"].items()) for r in ratios]
        lines.append(f"| {row['model']} | {row['dense_gmacs']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--models", nargs="*", help="a subset of the model names (default: all)")
    args = parser.parse_args(argv)
    rows = []
    with installed():
        for name, make in official_models().items():
            if args.models and name not in args.models:
                continue
            rows.append(measure(name, make, RATIOS))
            print(markdown(rows[-1:], RATIOS).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "official_flops.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "official_flops.md").write_text(markdown(rows, RATIOS))
    return rows


if __name__ == "__main__":
    main()
