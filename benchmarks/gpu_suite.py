"""The GPU targets of the design notes in one command (at most ~8 minutes on an H100/H200).

    PYTHONPATH=. python benchmarks/gpu_suite.py               # on the GPU machine, from a working tree
    PYTHONPATH=. python benchmarks/gpu_suite.py --quick       # tiny shapes on the CPU, seconds: checks the suite

Sections (each with its target from issue 17 / DESIGN.md and whether it is met):
- scan: the selective scan alone at ViM-S shapes (batch 128, D=768, L=197, N=16), fp32 and bf16,
  ms per call and the bandwidth of its compulsory traffic (target <= 0.15 ms);
- dense: ViM-S bf16 batch 128, torch.compile (target <= 25 ms per 128 images);
- pruned: (d)/(b) at schedule "top" and ratio 0.5 (targets >= 1.35x and >= 1.9x), the ratio-0 control;
- token_ops: score/select/gather and alignment ops' share of the pruned model (target <= 3%);
- cudagraph: batch-1 latency with CUDA graphs (torch.compile mode="reduce-overhead"), dense vs
  pruned at "top" and 0.5 (target >= 1.2x);
- cuda_tests: the tests skipped without a GPU (CUDA_TESTS), run with pytest in a subprocess.

Needs only torch (+ Triton on the GPU) and mambaprune's own dependencies: the timing and the variants
are benchmarks/speed.py's. Writes <out>/gpu_suite.json and gpu_suite.md (default benchmarks/results/).
--quick runs every section on the CPU with a tiny ViM, torch.compile(backend="eager") and no CUDA
graphs: its numbers check the plumbing, they measure nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import speed  # noqa: E402

# the CUDA-only tests (skip-marked without a GPU): files and the -k expression that picks them
CUDA_TESTS = (["tests/test_scan_triton.py", "tests/test_export.py"], "cuda or tensorrt")
VARIANTS = ("top", "0.5")
FULL = {"model": "vim_s", "size": 224, "batch": 128, "dtype": "bfloat16", "scan_shape": (128, 768, 197, 16)}
QUICK = {"model": "vim_t", "size": 64, "batch": 2, "dtype": "float32", "scan_shape": (2, 64, 32, 16)}
TARGETS = {"scan_ms": 0.15, "dense_ms": 25.0, "d_over_b": {"top": 1.35, "0.5": 1.9}, "token_op_share": 0.03,
           "cudagraph_speedup": 1.2}


def suite_args(quick: bool) -> argparse.Namespace:
    """The arguments benchmarks/speed.py's helpers read."""
    return argparse.Namespace(quick=quick, ratios=["0", *VARIANTS], alignments=["hold"], warmup=1,
                              repeat=2 if quick else 10, attempts=1, others_max=1.0, no_compile=False)


def scan_section(device: str, cfg: dict, quick: bool) -> dict:
    out = speed.scan_bandwidth(device, cfg["scan_shape"], repeat=2 if quick else 20)
    for entry in out.values():
        entry["target_ms"], entry["met"] = TARGETS["scan_ms"], entry["ms"] <= TARGETS["scan_ms"]
    return out


def model_sections(device: str, cfg: dict, args) -> dict:
    """dense, pruned, token_ops and cudagraph: one prepared model, every variant interleaved."""
    prep = speed.prepare(cfg["model"], args, cfg["size"], device, getattr(torch, cfg["dtype"]))
    if args.quick:  # no C++ compile in a test: dynamo alone
        prep["compiled_model"] = torch.compile(prep["model"], backend="eager")
        prep["compiled"] = {k: torch.compile(p.graph_module, backend="eager") for k, p in prep["variants"].items()}
    rows = speed.bench_rows(prep, args, [cfg["batch"]])
    dense = {"model": cfg["model"], "batch": cfg["batch"], "dtype": cfg["dtype"],
             "ms": rows[0]["b_dense_compiled_ms"], "target_ms": TARGETS["dense_ms"]}
    dense["met"] = dense["ms"] <= TARGETS["dense_ms"]
    pruned = {r["ratio"]: {k: r[k] for k in ("flops_reduction", "ideal_speedup", "b_dense_compiled_ms",
                                             "d_pruned_compiled_ms", "speedup_d_over_b", "d_over_b_of_ideal")}
              for r in rows}
    for ratio, target in TARGETS["d_over_b"].items():
        pruned[ratio]["target"], pruned[ratio]["met"] = target, pruned[ratio]["speedup_d_over_b"] >= target
    control = speed.control_verdict(rows)[0]
    token_ops = {r["ratio"]: {"share": r["token_op_share"], "ms": r["token_op_ms"],
                              "target": TARGETS["token_op_share"], "met": r["token_op_share"] <= TARGETS["token_op_share"]}
                 for r in rows if r["ratio"] != "0"}
    return {"dense": dense, "pruned": dict(pruned, control=control), "token_ops": token_ops,
            "cudagraph": cudagraph_section(prep, device, args)}


def cudagraph_section(prep: dict, device: str, args) -> dict:
    x = torch.randn(1, 3, prep["size"], prep["size"], device=device, dtype=prep["dtype"])
    kwargs = {"mode": "reduce-overhead"} if device == "cuda" else {"backend": "eager"}
    out = {}
    for key in VARIANTS:
        entry = speed.cudagraph_latency(prep["model"], prep["variants"][f"{key}/hold"], x, args, **kwargs)
        entry["target"], entry["met"] = TARGETS["cudagraph_speedup"], entry["speedup"] >= TARGETS["cudagraph_speedup"]
        out[key] = entry
    return out


def junit_counts(path: Path) -> dict:
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def cuda_tests_section() -> dict:
    """The skip-marked CUDA tests, run in a subprocess (pytest must be installed where the suite runs)."""
    files, expression = CUDA_TESTS
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files, "-k", expression,
                   f"--junitxml={report}"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT.parent, capture_output=True, text=True, check=False)
        result = {"command": " ".join(["python", *command[1:-1]]), "returncode": done.returncode,
                  "seconds": round(time.perf_counter() - start, 1), "tail": done.stdout[-1500:] + done.stderr[-500:]}
        if report.exists():
            result.update(junit_counts(report))
    return result


def finite_numbers(value) -> bool:
    """True when every number inside value (dicts, lists) is finite."""
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def markdown(result: dict) -> str:
    lines = [f"# GPU suite ({result['date']}{', QUICK: plumbing check on the CPU, not a measurement' if result['quick'] else ''})",
             "", f"Device: {result['machine']}; torch {result['torch']}.  ", f"Command: `{result['command']}` "
             f"({result['wall_s']:.0f} s).", "", "| section | measure | value | target | met |", "|---|---|---|---|---|"]
    for dtype, s in result["scan"].items():
        lines.append(f"| scan {s['shape']} {dtype} | ms ({s['GB_per_s']:.0f} GB/s) | {s['ms']:.3f} | <= {s['target_ms']} | {s['met']} |")
    d = result["dense"]
    lines.append(f"| dense {d['model']} {d['dtype']} batch {d['batch']}, compiled | ms | {d['ms']:.2f} | <= {d['target_ms']} | {d['met']} |")
    for ratio in VARIANTS:
        p = result["pruned"][ratio]
        lines.append(f"| (d)/(b) at {ratio} (ideal {p['ideal_speedup']:.2f}x) | speed-up | {p['speedup_d_over_b']:.2f}x | "
                     f">= {p['target']}x | {p['met']} |")
    c = result["pruned"]["control"]
    lines.append(f"| ratio-0 control | (d)/(b) | {c['d_over_b']:.2f}x | within {speed.CONTROL_TOLERANCE:.0%} of 1 | {c['reliable']} |")
    for ratio, t in result["token_ops"].items():
        lines.append(f"| token ops at {ratio} | share | {100 * t['share']:.1f}% | <= {100 * t['target']:.0f}% | {t['met']} |")
    for ratio, g in result["cudagraph"].items():
        lines.append(f"| batch-1 CUDA graphs at {ratio} ({g['dense_ms']:.2f} / {g['pruned_ms']:.2f} ms) | speed-up | "
                     f"{g['speedup']:.2f}x | >= {g['target']}x | {g['met']} |")
    t = result["cuda_tests"]
    lines.append(f"| CUDA tests (`{t['command']}`) | passed / failed / errors / skipped | {t.get('passed', '-')} / "
                 f"{t.get('failures', '-')} / {t.get('errors', '-')} / {t.get('skipped', '-')} | all pass | "
                 f"{t['returncode'] == 0} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: checks the suite in seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder for gpu_suite.json / .md")
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA tests section")
    options = parser.parse_args(argv)
    device = "cpu" if options.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device (torch.cuda.is_available() is False); --quick checks it on the CPU")
    cfg, args, start, spent = (QUICK if options.quick else FULL), suite_args(options.quick), time.perf_counter(), {}
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": options.quick,
              "machine": speed.machine(device), "torch": torch.__version__,
              "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with speed.phase(spent, "scan"):
        result["scan"] = scan_section(device, cfg, options.quick)
    with speed.phase(spent, "models"):
        result.update(model_sections(device, cfg, args))
    with speed.phase(spent, "cuda_tests"):
        result["cuda_tests"] = ({"command": "skipped (--no-tests)", "returncode": 0} if options.no_tests
                                else cuda_tests_section())
    result["wall_s"], result["section_s"] = round(time.perf_counter() - start, 1), spent
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "gpu_suite.json").write_text(json.dumps(result, indent=1) + "\n")
    (options.out / "gpu_suite.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
