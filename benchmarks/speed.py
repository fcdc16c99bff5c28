"""Speed of dense vs pruned models, eager and torch.compile, side by side in one run.

For each model and ratio: (a) original eager, (b) original torch.compile, (c) pruned eager,
(d) pruned torch.compile; speedup (d)/(b) next to the ideal dense/pruned FLOPs; on a GPU also bf16,
CUDA graphs at batch 1 and the scan kernel's bandwidth; the share of the pruned model's time spent in
score/select/gather (per-node timing of the eager graph). Optional ONNX Runtime dense vs pruned.

    python benchmarks/speed.py                   # GPU when available, else the CPU set
    python benchmarks/speed.py --quick           # tiny models, seconds: checks the script end to end
    python benchmarks/speed.py --device cpu --models vim_t --batches 8

Writes benchmarks/results/speed_<device>.json, .md and .png (measured vs ideal speedup).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.runtime import token_index  # noqa: E402

TOKEN_OPS = {getattr(token_index, name) for name in (
    "token_scores", "select_tokens", "take", "lookup", "layout_order", "inverse_order", "gather_tokens",
    "initial_positions", "compacted_positions", "scores_to_identity", "slot_of_position", "read_slot",
    "align_constant", "path_gaps")}
RATIOS = ("0", "top", "0.3", "0.5")


def timed(fn, *args, warmup: int, repeat: int, device: str) -> float:
    """Median wall time of fn(*args) in milliseconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(*args)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def token_op_share(pruned, x) -> float:
    """Fraction of the eager pruned graph's time spent in score/select/gather nodes."""
    spent = {"token": 0.0, "all": 0.0}

    class Timing(fx.Interpreter):
        def run_node(self, node):
            start = time.perf_counter()
            out = super().run_node(node)
            if x.is_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            spent["all"] += elapsed
            if node.target in TOKEN_OPS:
                spent["token"] += elapsed
            return out

    with torch.no_grad():
        Timing(pruned.graph_module).run(x)
        spent["token"] = spent["all"] = 0.0
        Timing(pruned.graph_module).run(x)
    return spent["token"] / spent["all"] if spent["all"] else 0.0


def compile_for(ratio: str, model, example, dtype):
    kwargs = {"schedule": "top"} if ratio == "top" else {"ratio": float(ratio)}
    return compile_pruned(model, example_inputs=(example,), verify=False, **kwargs)


def interleaved(runners: dict, x, warmup: int, repeat: int, device: str) -> dict:
    """Best-of-`repeat` milliseconds per runner, the runners timed round-robin.

    Interleaving spreads a noisy neighbour's slowdown over every variant instead of one, and the
    minimum is the estimate least affected by it (a shared 2-core VM varies by +-40% run to run).
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = {name: float("inf") for name in runners}
    with torch.no_grad():
        for fn in runners.values():
            for _ in range(warmup):
                fn(x)
        sync()
        for _ in range(repeat):
            for name, fn in runners.items():
                start = time.perf_counter()
                fn(x)
                sync()
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def bench_model(name, args, device, dtype, batch, size):
    model = create_model(name, img_size=size, **(QUICK_OVERRIDES if args.quick else {})).eval().to(device, dtype)
    example = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    runners = {"a_dense_eager_ms": model, "b_dense_compiled_ms": torch.compile(model)}
    pruned_models = {}
    for ratio in args.ratios:
        pruned = compile_for(ratio, model, example, dtype)
        pruned_models[ratio] = pruned
        runners[f"c_pruned_eager_ms/{ratio}"] = pruned
        runners[f"d_pruned_compiled_ms/{ratio}"] = torch.compile(pruned.graph_module)
    times = interleaved(runners, x, args.warmup, args.repeat, device)
    rows = []
    for ratio, pruned in pruned_models.items():
        row = {
            "model": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "ratio": ratio, "flops_reduction": round(pruned.report.achieved_ratio, 4),
            "ideal_speedup": round(pruned.report.dense_flops / pruned.report.pruned_flops, 3),
            "a_dense_eager_ms": times["a_dense_eager_ms"], "b_dense_compiled_ms": times["b_dense_compiled_ms"],
            "c_pruned_eager_ms": times[f"c_pruned_eager_ms/{ratio}"],
            "d_pruned_compiled_ms": times[f"d_pruned_compiled_ms/{ratio}"],
            "token_op_share": round(token_op_share(pruned, x), 4) if ratio != "0" else 0.0,
        }
        row["speedup_d_over_b"] = round(row["b_dense_compiled_ms"] / row["d_pruned_compiled_ms"], 3)
        row["speedup_c_over_a"] = round(row["a_dense_eager_ms"] / row["c_pruned_eager_ms"], 3)
        row["throughput_d_img_s"] = round(batch / row["d_pruned_compiled_ms"] * 1e3, 1)
        if device == "cuda" and batch == 1:
            graphs = {"pruned": torch.compile(pruned.graph_module, mode="reduce-overhead"),
                      "dense": torch.compile(model, mode="reduce-overhead")}
            cuda_graph_times = interleaved(graphs, x, args.warmup, args.repeat, device)
            row["cudagraph_pruned_ms"], row["cudagraph_dense_ms"] = cuda_graph_times["pruned"], cuda_graph_times["dense"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def onnxruntime_rows(args, size) -> list:
    """ONNX Runtime on the CPU, dense vs pruned (needs the onnx extra)."""
    try:
        import onnxruntime as ort  # noqa: F401
    except ImportError:
        print("onnxruntime not installed: skipping the ONNX Runtime rows", flush=True)
        return []
    import tempfile
    rows = []
    for name in args.models:
        model = create_model(name, img_size=size, **(QUICK_OVERRIDES if args.quick else {})).eval()
        example = torch.randn(1, 3, size, size)
        x = torch.randn(args.ort_batch, 3, size, size)
        times = {}
        for ratio in ("0", "0.3"):
            pruned = compile_for(ratio, model, example, torch.float32)
            with tempfile.TemporaryDirectory() as tmp:
                path = pruned.export(Path(tmp) / "model.onnx")
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                feed = {session.get_inputs()[0].name: x.numpy()}
                times[ratio] = timed(lambda: session.run(None, feed), warmup=1, repeat=args.repeat, device="cpu")
        row = {"model": name, "runtime": "onnxruntime-cpu", "batch": args.ort_batch,
               "dense_ms": times["0"], "pruned_0.3_ms": times["0.3"],
               "speedup": round(times["0"] / times["0.3"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def scan_bandwidth(device) -> dict:
    """The selective scan alone at ViM-S shapes (batch 128, D=768, L=197, N=16), GPU only."""
    if device != "cuda":
        return {}
    from mambaprune.runtime import selective_scan
    out = {}
    props = torch.cuda.get_device_properties(0)
    for dtype in (torch.float32, torch.bfloat16):
        b, d, length, n = 128, 768, 197, 16
        u = torch.randn(b, length, d, device="cuda", dtype=dtype).transpose(1, 2)
        delta = torch.rand(b, length, d, device="cuda", dtype=dtype).transpose(1, 2) * 0.1
        A = -torch.rand(d, n, device="cuda")
        B = torch.randn(b, n, length, device="cuda", dtype=dtype)
        C = torch.randn(b, n, length, device="cuda", dtype=dtype)
        D = torch.ones(d, device="cuda")
        z = torch.randn(b, length, d, device="cuda", dtype=dtype).transpose(1, 2)
        ms = timed(lambda: selective_scan(u, delta, A, B, C, D, z), warmup=5, repeat=50, device="cuda")
        moved = (4 * b * d * length + 2 * b * n * length) * u.element_size()
        out[str(dtype)] = {"ms": ms, "GB_per_s": moved / ms / 1e6, "device": props.name}
        reference = mamba_ssm_scan()
        if reference is not None:  # the CUDA kernel of state-spaces/mamba on the same shapes, when installed
            out[str(dtype)]["mamba_ssm_ms"] = timed(lambda: reference(u.contiguous(), delta.contiguous(), A, B, C, D,
                                                                      z.contiguous()),
                                                    warmup=5, repeat=50, device="cuda")
    return out


def mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or its CUDA extension does not load: not a dependency
        return None
    return selective_scan_fn


QUICK_OVERRIDES = dict(depth=4, embed_dim=64)


def write_outputs(rows, ort_rows, scan, device, args):
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    stem = results / f"speed_{device}{'_quick' if args.quick else ''}"
    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    payload = {"machine": machine, "torch": torch.__version__, "rows": rows, "onnxruntime": ort_rows,
               "scan": scan}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [f"# Speed on {device} ({machine}, torch {torch.__version__})", "",
             "Best of the repeats, variants timed round-robin; the ratio-0 row runs the dense graph through the",
             "pruned path and shows the measurement noise.", "",
             "| model | dtype | batch | ratio | FLOPs -% | (a) dense eager ms | (b) dense compiled ms | "
             "(c) pruned eager ms | (d) pruned compiled ms | (c)/(a) | (d)/(b) | ideal | token ops share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['ratio']} | {100 * r['flops_reduction']:.1f} | "
                     f"{r['a_dense_eager_ms']:.1f} | {r['b_dense_compiled_ms']:.1f} | {r['c_pruned_eager_ms']:.1f} | "
                     f"{r['d_pruned_compiled_ms']:.1f} | {r['speedup_c_over_a']:.2f}x | {r['speedup_d_over_b']:.2f}x | "
                     f"{r['ideal_speedup']:.2f}x | "
                     f"{100 * r['token_op_share']:.1f}% |")
    if ort_rows:
        lines += ["", "| model | ONNX Runtime CPU batch | dense ms | pruned (0.3) ms | speedup |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['dense_ms']:.1f} | {r['pruned_0.3_ms']:.1f} | {r['speedup']:.2f}x |"
                  for r in ort_rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["dtype"], r["batch"]) for r in rows}):
        series = sorted((r for r in rows if (r["model"], r["dtype"], r["batch"]) == key),
                        key=lambda r: r["flops_reduction"])
        xs = [100 * r["flops_reduction"] for r in series]
        ax.plot(xs, [r["speedup_d_over_b"] for r in series], "o-", label=f"{key[0]} {key[1]} b{key[2]}")
    ideal = sorted({(100 * r["flops_reduction"], r["ideal_speedup"]) for r in rows})
    ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", label="ideal (FLOPs)")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("speedup, pruned vs dense (torch.compile)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--ratios", nargs="+", default=list(RATIOS))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=None)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--ort-batch", type=int, default=8)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny models at 64x64 to check the script quickly")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.models = args.models or (["vim_t", "vim_s", "plainmamba_l1", "plainmamba_l3"] if gpu else ["vim_t", "plainmamba_l1"])
    batches = args.batches or ([1, 32, 128] if gpu else [1, 8])
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"]))]
    size = 64 if args.quick else args.img_size
    if args.quick:
        args.warmup, args.repeat, batches = 1, 3, [2]
    rows = []
    for name in args.models:
        for dtype in dtypes:
            for batch in batches:
                rows += bench_model(name, args, args.device, dtype, batch, size)
    ort_rows = [] if args.no_onnx or gpu else onnxruntime_rows(args, size)
    write_outputs(rows, ort_rows, scan_bandwidth(args.device), args.device, args)


if __name__ == "__main__":
    main()
