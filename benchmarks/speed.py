"""Speed of dense vs pruned models, eager and torch.compile, every variant interleaved in one run.

For each model, batch and variant (ratio x alignment): (a) original eager, (b) original
torch.compile, (c) pruned eager, (d) pruned torch.compile; (d)/(b) next to the ideal dense/pruned
FLOPs. Every variant of one (model, dtype, batch) is timed round robin in one block
(mambaprune.runtime.timing, the demo's helper too), after a compile-and-warm call each.

Honest accounting:
- the ratio-0 row runs the dense graph through the pruned path: it is the control, and when its
  (c)/(a) or (d)/(b) is not within CONTROL_TOLERANCE of 1.0 the run says the block is unreliable;
- the token-op share counts score, select and gather (runtime/token_index.py) and every alignment op
  (every mambaprune:: custom op but the scan: pos_conv1d, pos_conv2d, path_order, ...), timed per
  node on the eager pruned graph;
- the GEMM floor: the model's linear and conv MACs at the rate a model-sized matmul reaches in the
  same run, and the dense model's time as a multiple of it;
- ONNX Runtime (CPU) dense vs pruned in the same run: the ratio-0 export and each pruned export,
  interleaved;
- --profile: torch.profiler's top ops of the dense and the most pruned model at the first batch.

    python benchmarks/speed.py                   # GPU when available, else the CPU set
    python benchmarks/speed.py --quick           # tiny models, seconds: checks the script end to end
    python benchmarks/speed.py --device cpu --models vim_t --batches 1 8 --profile

Writes benchmarks/results/speed_<device>.json, .md and .png (measured vs ideal speedup); --out
changes the stem.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.runtime import timing, token_index, token_ops  # noqa: E402

RATIOS = ("0", "top", "0.3", "0.5")
CONTROL_TOLERANCE = 0.05
TOKEN_OP_MODULES = {token_index.__name__, token_ops.__name__}
SCAN_OPS = ("selective_scan", "ssd_scan")   # the model's own scans (Mamba-1, Mamba-2): not token ops
QUICK_OVERRIDES = {"depth": 12, "embed_dim": 64}   # deep enough that 0.5 is reachable keeping >= 1/8 of the tokens
GEMM_OPS = ("mm", "addmm", "bmm", "convolution", "_convolution", "linear")


# ----------------------------------------------------------------------------- what counts as a token op

def op_name(target) -> str:
    """'mambaprune::pos_conv1d', 'aten::mm', or the function's name for a Python call_function target."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.name() if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
    return getattr(target, "__name__", str(target))


def is_token_op(target) -> bool:
    """Score, select, gather, or an alignment op: what pruning adds to the model besides smaller tensors."""
    if getattr(target, "__module__", None) in TOKEN_OP_MODULES:
        return True
    name = op_name(target)
    return name.startswith("mambaprune::") and not any(scan in name for scan in SCAN_OPS)


def token_op_share(graph_module: fx.GraphModule, x, sync) -> dict:
    """Share of the eager graph's node time spent in token ops, and the ms of each token op (second run)."""
    spent = {}

    class Timing(fx.Interpreter):
        def run_node(self, node):
            start = time.perf_counter()
            out = super().run_node(node)
            sync()
            key = op_name(node.target) if node.op == "call_function" and is_token_op(node.target) else None
            spent[key] = spent.get(key, 0.0) + (time.perf_counter() - start) * 1e3
            return out

    with torch.no_grad():
        Timing(graph_module).run(x)
        spent.clear()
        Timing(graph_module).run(x)
    total = sum(spent.values())
    ops = {k: round(v, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if k is not None}
    return {"share": round(sum(ops.values()) / total, 4) if total else 0.0, "ms": ops}


# ----------------------------------------------------------------------------- variants

def variant_key(ratio: str, alignment: str) -> str:
    return "0" if ratio == "0" else f"{ratio}/{alignment}"


def compile_variant(ratio: str, alignment: str, model, example):
    kwargs = {"schedule": "top"} if ratio == "top" else {"ratio": float(ratio)}
    return compile_pruned(model, example_inputs=(example,), verify=False, alignment=alignment, **kwargs)


def pruned_variants(model, example, ratios, alignments) -> dict:
    """{variant key: PrunedModel}; ratio 0 once (no site: alignment does not apply)."""
    variants = {}
    for ratio in ratios:
        for alignment in ((alignments[0],) if ratio == "0" else alignments):
            variants[variant_key(ratio, alignment)] = compile_variant(ratio, alignment, model, example)
    return variants


def sync_for(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def timed_block(runners: dict, x, args, device: str) -> timing.Timings:
    """Every runner called once (compiles, warms), then all of them interleaved round robin."""
    with torch.no_grad():
        for fn in runners.values():
            fn(x)
        sync_for(device)()
        return timing.interleaved({name: (lambda fn=fn: fn(x)) for name, fn in runners.items()}, args.repeat,
                                  warmup=args.warmup, sync=sync_for(device), attempts=args.attempts,
                                  others_max=args.others_max, wait_s=5.0)


def runners_for(model, compiled_model, variants: dict, compiled: dict) -> dict:
    """(a) dense eager, (c) each pruned graph eager, and (b)/(d) their torch.compile wrappers where built."""
    runners = {"a": model, **({"b": compiled_model} if compiled_model is not None else {})}
    for key, pruned in variants.items():
        runners[f"c/{key}"] = pruned.graph_module
        if key in compiled:
            runners[f"d/{key}"] = compiled[key]
    return runners


def variant_rows(name, dtype, batch, device, variants: dict, times: timing.Timings, x) -> list:
    rows = []
    for key, pruned in variants.items():
        ratio, _, alignment = key.partition("/")
        ms = {"b": math.nan, f"d/{key}": math.nan, **times.ms}  # NaN: not compiled (--no-compile)
        row = {"model": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
               "ratio": ratio, "alignment": alignment or "-",
               "flops_reduction": round(pruned.report.achieved_ratio, 4),
               "ideal_speedup": round(pruned.report.dense_flops / pruned.report.pruned_flops, 3),
               "a_dense_eager_ms": ms["a"], "b_dense_compiled_ms": ms["b"],
               "c_pruned_eager_ms": ms[f"c/{key}"], "d_pruned_compiled_ms": ms[f"d/{key}"],
               "others_cpu_share": times.others_cpu_share}
        row["speedup_c_over_a"] = round(row["a_dense_eager_ms"] / row["c_pruned_eager_ms"], 3)
        row["speedup_d_over_b"] = round(row["b_dense_compiled_ms"] / row["d_pruned_compiled_ms"], 3)
        row["d_over_b_of_ideal"] = round(row["speedup_d_over_b"] / row["ideal_speedup"], 3)
        row["throughput_d_img_s"] = round(batch / row["d_pruned_compiled_ms"] * 1e3, 1)
        share = token_op_share(pruned.graph_module, x, sync_for(device)) if ratio != "0" else {"share": 0.0, "ms": {}}
        row["token_op_share"], row["token_op_ms"] = share["share"], share["ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def control_verdict(rows: list) -> list:
    """One entry per (model, dtype, batch): the ratio-0 row's speed-ups and whether they are within tolerance."""
    verdicts = []
    for r in rows:
        if r["ratio"] != "0":
            continue
        worst = max(abs(r[key] - 1) for key in ("speedup_c_over_a", "speedup_d_over_b") if not math.isnan(r[key]))
        verdict = {"model": r["model"], "dtype": r["dtype"], "batch": r["batch"], "c_over_a": r["speedup_c_over_a"],
                   "d_over_b": r["speedup_d_over_b"], "reliable": worst <= CONTROL_TOLERANCE}
        if not verdict["reliable"]:
            print(f"UNRELIABLE: {r['model']} {r['dtype']} batch {r['batch']}: the ratio-0 control gives (c)/(a) "
                  f"{r['speedup_c_over_a']:.2f}x and (d)/(b) {r['speedup_d_over_b']:.2f}x, not within "
                  f"{CONTROL_TOLERANCE:.0%} of 1.0 (others took {r['others_cpu_share']:.0%} of the CPU)", flush=True)
        verdicts.append(verdict)
    return verdicts


def make_model(name: str, args, size: int, device, dtype):
    return create_model(name, img_size=size, **(QUICK_OVERRIDES if args.quick else {})).eval().to(device, dtype)


def prepare(name: str, args, size: int, device, dtype) -> dict:
    """The model, its pruned variants and their torch.compile wrappers: built once for every batch."""
    model = make_model(name, args, size, device, dtype)
    example = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    variants = pruned_variants(model, example, args.ratios, args.alignments)
    compiled = not args.no_compile
    return {"name": name, "dtype": dtype, "device": device, "size": size, "model": model, "variants": variants,
            "compiled_model": torch.compile(model) if compiled else None,
            "compiled": {key: torch.compile(pruned.graph_module) for key, pruned in variants.items()} if compiled else {}}


def fill_compile_cache(prep: dict, batches) -> None:
    """Call every compiled runner once per batch: compiles into the inductor cache, times nothing."""
    for batch in batches:
        x = torch.randn(batch, 3, prep["size"], prep["size"], device=prep["device"], dtype=prep["dtype"])
        with torch.no_grad():
            prep["compiled_model"](x)
            for fn in prep["compiled"].values():
                fn(x)


def bench_rows(prep: dict, args, batches) -> list:
    """Rows for every batch and variant of one prepared model."""
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, prep["size"], prep["size"], device=prep["device"], dtype=prep["dtype"])
        runners = runners_for(prep["model"], prep["compiled_model"], prep["variants"], prep["compiled"])
        times = timed_block(runners, x, args, prep["device"])
        rows += variant_rows(prep["name"], prep["dtype"], batch, prep["device"], prep["variants"], times, x)
    return rows


# ----------------------------------------------------------------------------- GEMM floor and profile

def gemm_macs(model, x) -> float:
    """Linear and conv MACs of one forward of `model` on x (FlopCounterMode counts 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts().get("Global", {})
    return sum(v for op, v in counts.items() if str(op).split(".")[-1] in GEMM_OPS) / 2


def gemm_floor(prep: dict, args, batch: int) -> dict:
    """The dense model's GEMM floor: its linear+conv MACs at the rate of a model-sized matmul (in_proj)."""
    model, size, device, dtype = prep["model"], prep["size"], prep["device"], prep["dtype"]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    dim = getattr(model, "embed_dim", 192)
    tokens = prep["variants"]["0"].report.token_length
    a = torch.randn(batch * tokens, dim, device=device, dtype=dtype)
    w = torch.randn(dim, 4 * dim, device=device, dtype=dtype)
    times = timing.interleaved({"matmul": lambda: a @ w}, args.repeat, fill_ms=25.0, sync=sync_for(device))
    rate = a.shape[0] * dim * 4 * dim / times.ms["matmul"] / 1e6  # MAC per ms -> GMAC/s
    macs = gemm_macs(model, x)
    return {"model": prep["name"], "batch": batch, "gemm_gmacs": round(macs / 1e9, 3),
            "matmul_shape": [a.shape[0], dim, 4 * dim], "matmul_gmac_per_s": round(rate, 1),
            "floor_ms": round(macs / 1e9 / rate * 1e3, 2)}


def profile_top(fn, x, top: int = 12) -> list:
    """torch.profiler's top ops by self CPU time for one call of fn(x) (after one warm call)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(x)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 3),
             "share": round(e.self_cpu_time_total / total, 4)} for e in events[:top]]


def profiles(prep: dict, batch: int) -> dict:
    """Top ops of the dense model and of each pruned variant (eager)."""
    x = torch.randn(batch, 3, prep["size"], prep["size"], device=prep["device"], dtype=prep["dtype"])
    result = {"dense": profile_top(prep["model"], x)}
    result.update({key: profile_top(pruned.graph_module, x) for key, pruned in prep["variants"].items() if key != "0"})
    return {"model": prep["name"], "batch": batch, "top_ops": result}


# ----------------------------------------------------------------------------- ONNX Runtime

def onnxruntime_sessions(variants: dict, ort) -> dict:
    """{variant key: CPU InferenceSession of its ONNX export}."""
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, pruned in variants.items():
            path = pruned.export(Path(tmp) / f"{key.replace('/', '_')}.onnx")
            sessions[key] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sessions


def onnxruntime_rows(prep: dict, args, batches) -> list:
    """ONNX Runtime on the CPU: the ratio-0 export (dense) and each pruned export, interleaved."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: skipping the ONNX Runtime rows", flush=True)
        return []
    sessions, rows = onnxruntime_sessions(prep["variants"], ort), []
    for batch in batches:
        feed = torch.randn(batch, 3, prep["size"], prep["size"]).numpy()
        calls = {key: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for key, s in sessions.items()}
        for call in calls.values():
            call()
        times = timing.interleaved(calls, args.repeat, warmup=args.warmup, attempts=args.attempts,
                                   others_max=args.others_max, wait_s=5.0)
        for key, pruned in prep["variants"].items():
            ideal = pruned.report.dense_flops / pruned.report.pruned_flops
            row = {"model": prep["name"], "runtime": f"onnxruntime {ort.__version__} cpu", "batch": batch,
                   "variant": key, "dense_ms": times.ms["0"], "ms": times.ms[key],
                   "speedup": round(times.ms["0"] / times.ms[key], 3), "ideal_speedup": round(ideal, 3),
                   "others_cpu_share": times.others_cpu_share}
            row["speedup_of_ideal"] = round(row["speedup"] / ideal, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- scan alone, CUDA graphs

def scan_inputs(batch: int, dim: int, length: int, dstate: int, device, dtype) -> dict:
    """ViM's layout: u, delta, z transposed views of (batch, L, D) tensors."""
    def tokens_last(channels):
        return torch.randn(batch, length, channels, device=device, dtype=dtype).transpose(1, 2)

    return {"u": tokens_last(dim), "delta": tokens_last(dim).sigmoid() * 0.1,
            "A": -torch.rand(dim, dstate, device=device), "B": torch.randn(batch, dstate, length, device=device, dtype=dtype),
            "C": torch.randn(batch, dstate, length, device=device, dtype=dtype), "D": torch.ones(dim, device=device),
            "z": tokens_last(dim)}


def scan_bandwidth(device, shape=(128, 768, 197, 16), dtypes=(torch.float32, torch.bfloat16), repeat: int = 20) -> dict:
    """The selective scan alone: ms per call and the bandwidth its compulsory traffic implies."""
    from mambaprune.runtime import selective_scan

    batch, dim, length, dstate = shape
    out = {}
    for dtype in dtypes:
        s = scan_inputs(batch, dim, length, dstate, device, dtype)
        with torch.no_grad():
            times = timing.interleaved({"scan": lambda: selective_scan(**s)}, repeat, fill_ms=25.0,
                                       sync=sync_for(device))
        ms = times.ms["scan"]
        moved = (4 * batch * dim * length + 2 * batch * dstate * length) * s["u"].element_size()
        out[str(dtype).replace("torch.", "")] = {"shape": list(shape), "ms": ms, "GB_per_s": round(moved / ms / 1e6, 1),
                                                 "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    return out


def cudagraph_latency(model, pruned, x, args, **compile_kwargs) -> dict:
    """Batch-1 latency dense vs pruned, compiled with compile_kwargs (default: CUDA graphs, mode="reduce-overhead")."""
    compile_kwargs = compile_kwargs or {"mode": "reduce-overhead"}
    runners = {"dense": torch.compile(model, **compile_kwargs),
               "pruned": torch.compile(pruned.graph_module, **compile_kwargs)}
    with torch.no_grad():
        for fn in runners.values():  # reduce-overhead records its graph on a later call than the first
            fn(x)
    times = timed_block(runners, x, args, x.device.type)
    return {"dense_ms": times.ms["dense"], "pruned_ms": times.ms["pruned"],
            "speedup": round(times.ms["dense"] / times.ms["pruned"], 3)}


# ----------------------------------------------------------------------------- outputs

def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return timing.cpu_description()


def markdown(payload: dict) -> str:
    rows, ort_rows = payload["rows"], payload["onnxruntime"]
    lines = [f"# Speed on {payload['device']} ({payload['machine']}, torch {payload['torch']}, {payload['date']})", "",
             f"Command: `{payload['command']}` ({payload['wall_s']:.0f} s).  ",
             "Best of the repeats, every variant of a batch timed round robin in one block; the ratio-0 row runs "
             "the dense graph through the pruned path (the control). Token ops: score, select, gather and "
             "every alignment op (eager graph, per node).", ""]
    for v in payload["control"]:
        state = "reliable" if v["reliable"] else f"UNRELIABLE (not within {CONTROL_TOLERANCE:.0%} of 1.0)"
        lines.append(f"- control {v['model']} batch {v['batch']}: (c)/(a) {v['c_over_a']:.2f}x, "
                     f"(d)/(b) {v['d_over_b']:.2f}x: {state}")
    lines += ["", "| model | dtype | batch | ratio | alignment | FLOPs -% | (a) dense eager ms | (b) dense compiled ms | "
              "(c) pruned eager ms | (d) pruned compiled ms | (c)/(a) | (d)/(b) | ideal | (d)/(b) of ideal | "
              "token ops share | others' CPU |", "|" + "---|" * 16]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['ratio']} | {r['alignment']} | "
                     f"{100 * r['flops_reduction']:.1f} | {r['a_dense_eager_ms']:.1f} | {r['b_dense_compiled_ms']:.1f} | "
                     f"{r['c_pruned_eager_ms']:.1f} | {r['d_pruned_compiled_ms']:.1f} | {r['speedup_c_over_a']:.2f}x | "
                     f"{r['speedup_d_over_b']:.2f}x | {r['ideal_speedup']:.2f}x | {r['d_over_b_of_ideal']:.2f} | "
                     f"{100 * r['token_op_share']:.1f}% | {100 * r['others_cpu_share']:.0f}% |")
    if payload["gemm_floor"]:
        lines += ["", "| model | batch | linear+conv GMAC | matmul GMAC/s | GEMM floor ms | (a) dense eager / floor |",
                  "|---|---|---|---|---|---|"]
        for f in payload["gemm_floor"]:
            lines.append(f"| {f['model']} | {f['batch']} | {f['gemm_gmacs']:.2f} | {f['matmul_gmac_per_s']:.0f} | "
                         f"{f['floor_ms']:.1f} | {f.get('dense_over_floor', math.nan):.1f}x |")
    if ort_rows:
        lines += ["", "| model | ONNX Runtime CPU batch | variant | dense ms | pruned ms | speed-up | ideal | of ideal |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['variant']} | {r['dense_ms']:.1f} | {r['ms']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['speedup_of_ideal']:.2f} |" for r in ort_rows]
    for key, s in payload["scan"].items():
        lines.append(f"\nScan alone {s['shape']} {key}: {s['ms']:.3f} ms, {s['GB_per_s']:.0f} GB/s")
    for p in payload["profiles"]:
        for variant, ops in p["top_ops"].items():
            lines += ["", f"Top ops, {p['model']} batch {p['batch']} {variant} (torch.profiler, self CPU time):", "",
                      "| op | calls | self ms | share |", "|---|---|---|---|"]
            lines += [f"| {o['op']} | {o['calls']} | {o['self_ms']:.2f} | {100 * o['share']:.1f}% |" for o in ops]
    return "\n".join(lines) + "\n"


def write_outputs(payload: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    plot(payload["rows"], stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["dtype"], r["batch"], r["alignment"]) for r in rows if r["ratio"] != "0"}):
        series = sorted((r for r in rows if (r["model"], r["dtype"], r["batch"], r["alignment"]) == key),
                        key=lambda r: r["flops_reduction"])
        ax.plot([100 * r["flops_reduction"] for r in series], [r["speedup_d_over_b"] for r in series], "o-",
                label=f"{key[0]} {key[1]} b{key[2]} {key[3]}")
    ideal = sorted({(100 * r["flops_reduction"], r["ideal_speedup"]) for r in rows})
    ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", label="ideal (FLOPs)")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("speedup, pruned vs dense (torch.compile)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--ratios", nargs="+", default=list(RATIOS))
    parser.add_argument("--alignments", nargs="+", default=["hold"], help="alignment of each pruned variant")
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=None)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1, help="untimed round-robin rounds")
    parser.add_argument("--repeat", type=int, default=5, help="timed round-robin rounds (best kept)")
    parser.add_argument("--attempts", type=int, default=2,
                        help="blocks measured again while other processes take over --others-max of the CPU")
    parser.add_argument("--others-max", type=float, default=0.1)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops (CPU) at the first batch")
    parser.add_argument("--no-compile", action="store_true", help="eager (a)/(c) and ONNX Runtime only: no torch.compile")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every variant into the inductor cache and time nothing (run it under a shared "
                             "lock before a timed run: a cold compile of ViM-T takes minutes per variant and batch)")
    parser.add_argument("--quick", action="store_true", help="tiny models at 64x64 to check the script quickly")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/speed_<device>)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.models = args.models or (["vim_t", "vim_s", "plainmamba_l1", "plainmamba_l3"] if gpu else ["vim_t"])
    args.batches = args.batches or ([1, 32, 128] if gpu else [1, 8])
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"])
    if args.quick:
        args.warmup, args.repeat, args.batches, args.attempts = 1, 2, [2], 1
    return args


@contextlib.contextmanager
def phase(spent: dict, name: str):
    """Adds the wall seconds of the block to spent[name] and prints them (where a run's time goes)."""
    start = time.perf_counter()
    yield
    spent[name] = round(spent.get(name, 0.0) + time.perf_counter() - start, 1)
    print(f"[{name}: {spent[name]:.0f} s so far]", flush=True)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    size, device = (64 if args.quick else args.img_size), args.device
    rows, floors, ort_rows, profiled, spent = [], [], [], [], {}
    for name in args.models:
        for dtype in args.dtypes:
            with phase(spent, "compile_pruned"):
                prep = prepare(name, args, size, device, getattr(torch, dtype))
            if args.compile_only:
                with phase(spent, "torch.compile"):
                    fill_compile_cache(prep, args.batches)
                continue
            with phase(spent, "torch.compile + timing"):
                rows += bench_rows(prep, args, args.batches)
            if dtype != args.dtypes[0]:
                continue
            with phase(spent, "GEMM floor"):
                floors += [gemm_floor(prep, args, batch) for batch in args.batches]
            if device == "cpu" and dtype == "float32" and not args.no_onnx:
                with phase(spent, "ONNX Runtime"):
                    ort_rows += onnxruntime_rows(prep, args, args.batches)
            if args.profile:
                with phase(spent, "profile"):
                    profiled.append(profiles(prep, args.batches[0]))
    if args.compile_only:
        return {"phase_s": spent}
    for f in floors:
        dense = [r["a_dense_eager_ms"] for r in rows if (r["model"], r["batch"]) == (f["model"], f["batch"])]
        f["dense_over_floor"] = round(dense[0] / f["floor_ms"], 2)
    payload = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
               "machine": machine(device), "torch": torch.__version__,
               "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "rows": rows, "control": control_verdict(rows), "gemm_floor": floors, "onnxruntime": ort_rows,
               "scan": scan_bandwidth(device) if device == "cuda" else {}, "profiles": profiled}
    payload["wall_s"], payload["phase_s"] = round(time.perf_counter() - start, 1), spent
    stem = args.out or ROOT / "results" / f"speed_{device}{'_quick' if args.quick else ''}"
    write_outputs(payload, stem)
    return payload


if __name__ == "__main__":
    main()
