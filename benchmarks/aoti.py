"""AOTInductor packages against the user's eager model and the eager pruned graph, on the CPU.

For each batch and ratio: (a) the user's eager model, (c) the eager pruned graph (compile_pruned),
(d) the AOTInductor package of the same pruned graph (export(format="aoti"), loaded with
torch._inductor.aoti_load_package), all variants of one batch timed round robin in one block
(mambaprune.runtime.timing), after one warm call each; the ideal speed-up is dense / pruned FLOPs.
Ratio 0 is the control: the package of the dense graph against the user's model.

--cpp also builds examples/aoti_cpp (cmake, libtorch from the torch wheel) and runs the first
package from C++: its output against the Python-loaded package's, and its mean latency (timed alone,
not interleaved).

    python benchmarks/aoti.py                       # ViM-T 224, batches 1 and 8, ratios 0 and 0.3
    python benchmarks/aoti.py --quick               # a small ViM at 64 x 64, batches 1 and 2: a smoke run
    python benchmarks/aoti.py --cpp                 # and the C++ example

Writes benchmarks/results/aoti_cpu.json and .md (--quick: aoti_cpu_quick.*; --out changes the stem).
"""
from __future__ import annotations

import argparse
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

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.deployment.aoti import load_aoti  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.runtime import timing  # noqa: E402

EXAMPLE = ROOT.parent / "examples" / "aoti_cpp"
QUICK = dict(model="vim_t", overrides={"depth": 2, "embed_dim": 64, "img_size": 64}, batches=(1, 2), rounds=2)
FULL = dict(model="vim_t", overrides={"img_size": 224}, batches=(1, 8), rounds=5)


def build_variants(model, size: int, ratios, folder: Path) -> dict:
    """{ratio: (pruned model, loaded package, compile seconds)}."""
    variants = {}
    for ratio in ratios:
        pruned = compile_pruned(model, ratio=ratio, example_inputs=(torch.randn(2, 3, size, size),))
        start = time.perf_counter()
        path = pruned.export(folder / f"ratio_{ratio}.pt2", format="aoti")
        variants[ratio] = (pruned, load_aoti(path), round(time.perf_counter() - start, 1), path)
    return variants


def time_batch(model, variants: dict, size: int, batch: int, rounds: int) -> dict:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    calls = {"a_eager_model": lambda: model(x)}
    for ratio, (pruned, package, _, _) in variants.items():
        calls[f"c_eager_pruned_{ratio}"] = lambda p=pruned: p(x)
        calls[f"d_aoti_{ratio}"] = lambda p=package: p(x)
    with torch.no_grad():
        diffs = {ratio: (package(x) - pruned(x)).abs().max().item() for ratio, (pruned, package, _, _) in variants.items()}
        result = timing.interleaved(calls, rounds=rounds, attempts=2)
    return {"batch": batch, "ms": result.ms, "others_cpu_share": result.others_cpu_share,
            "max_abs_diff_package_vs_pruned": diffs}


def run_cpp(package: Path, size: int, python_package, folder: Path, repeats: int, build: Path) -> dict:
    """Build examples/aoti_cpp in `build` (incremental) and run the package from C++ at batch 1."""
    prefix = torch.utils.cmake_prefix_path
    start = time.perf_counter()
    for command in (["cmake", f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release", "-S", str(EXAMPLE),
                     "-B", str(build)], ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return {"built": False, "error": (done.stdout + done.stderr)[-2000:]}
    built_s = round(time.perf_counter() - start, 1)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))
    x.numpy().tofile(folder / "x.bin")
    done = subprocess.run([str(build / "aoti_run"), str(package), str(folder / "x.bin"), str(folder / "y.bin"),
                           "1", "3", str(size), str(size), str(repeats)], capture_output=True, text=True)
    if done.returncode:
        return {"built": True, "build_s": built_s, "ran": False, "error": (done.stdout + done.stderr)[-2000:]}
    y = torch.from_numpy(__import__("numpy").fromfile(folder / "y.bin", dtype="float32"))
    with torch.no_grad():
        expected = python_package(x).reshape(-1)
    ms = next((float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("ms_per_run")), None)
    return {"built": True, "build_s": built_s, "ran": True, "max_abs_diff_vs_python_package":
            (y - expected).abs().max().item(), "ms_per_run_batch_1": ms}


def markdown(result: dict) -> str:
    lines = [f"# AOTInductor package vs eager ({result['model']}, {result['img_size']} px, CPU)", "",
             f"{result['date']}; {result['machine']}; `{result['command']}`", ""]
    if result["quick"]:
        lines += ["**--quick smoke run on a shared machine: not a measurement to quote.**", ""]
    lines += ["(d)/(d0): the pruned package against the ratio-0 package (the dense-equivalent engine), and that "
              "speed-up's share of the FLOPs ideal; (c)/(a) likewise for the eager pruned graph.", "",
              "| batch | ratio | ideal | (a) eager model ms | (c) eager pruned ms | (d) AOTI ms | (c)/(a) speed-up | "
              "(c)/(a) of ideal | (d)/(a) speed-up | (d)/(d0) speed-up | (d)/(d0) of ideal | (d) vs pruned max abs diff | "
              "others' CPU share |", "|---" * 13 + "|"]
    for row in result["rows"]:
        a = row["ms"]["a_eager_model"]
        d0 = row["ms"].get(f"d_aoti_{result['ratios'][0]}") if result["ratios"][0] == 0 else None
        for ratio in result["ratios"]:
            c, d, ideal = row["ms"][f"c_eager_pruned_{ratio}"], row["ms"][f"d_aoti_{ratio}"], result["ideal"][str(ratio)]
            package = f"{d0 / d:.2f}x | {d0 / d / ideal:.2f}" if d0 and ratio else "- | -"
            lines.append(f"| {row['batch']} | {ratio} | {ideal:.2f}x | {a:.1f} | {c:.1f} | {d:.1f} | "
                         f"{a / c:.2f}x | {a / c / ideal:.2f} | {a / d:.2f}x | {package} | "
                         f"{row['max_abs_diff_package_vs_pruned'][ratio]:.1e} | {row['others_cpu_share']:.2f} |")
    lines += ["", "AOTI compile seconds per ratio: " + ", ".join(f"{r}: {s}" for r, s in result["compile_s"].items())]
    if result.get("cpp"):
        lines += ["", f"C++ example (examples/aoti_cpp): {json.dumps(result['cpp'])}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small ViM at 64 px, batches 1 and 2, 2 rounds")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.3])
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpp", action="store_true", help="also build and run examples/aoti_cpp")
    parser.add_argument("--cpp-build", type=Path, help="cmake build folder for --cpp (default: a temporary one)")
    parser.add_argument("--out", help="results stem (default aoti_cpu, --quick: aoti_cpu_quick)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(setup["model"], **setup["overrides"]).eval()
    size = setup["overrides"]["img_size"]
    with tempfile.TemporaryDirectory(prefix="mambaprune-aoti-") as tmp:
        variants = build_variants(model, size, args.ratios, Path(tmp))
        rows = [time_batch(model, variants, size, b, args.rounds or setup["rounds"]) for b in args.batches or setup["batches"]]
        first = next(iter(variants.values()))
        cpp = run_cpp(first[3], size, first[1], Path(tmp), args.rounds or setup["rounds"],
                      args.cpp_build or Path(tmp) / "cpp_build") if args.cpp else None
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": timing.cpu_description(),
              "command": "python benchmarks/aoti.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "quick": args.quick, "model": setup["model"], "img_size": size, "overrides": setup["overrides"],
              "ratios": args.ratios, "rows": rows,
              "ideal": {str(r): v[0].report.dense_flops / v[0].report.pruned_flops for r, v in variants.items()},
              "compile_s": {str(r): v[2] for r, v in variants.items()}, "cpp": cpp}
    stem = args.out or ("aoti_cpu_quick" if args.quick else "aoti_cpu")
    out = ROOT / "results"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
