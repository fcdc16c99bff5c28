"""Dense vs pruned served by a real Triton Inference Server under concurrent load (loopback only).

    python benchmarks/serve_triton.py                       # ViM-T 224, ratio 0.3, 8 clients, 3 x 20 s per model
    python benchmarks/serve_triton.py --smoke               # tiny ViM, 2 clients, 2 s: checks the script

Both models are compiled by compile_pruned (dense = ratio 0: the captured graph, nothing pruned) and
written into ONE model repository (deployment.triton.write_model_repository), served by one
tritonserver on 127.0.0.1 with the same settings (python backend, dynamic batching, instances,
threads). The load is closed-loop: N client threads, each with its own HTTP client, send batch-B
requests back to back for --duration seconds or until --max-requests per phase (whichever first);
phases alternate dense / pruned for --rounds rounds, so a busy neighbour slows both alike. Reported
per model: throughput (images / s over all rounds), latency p50 / p99 (ms, every request), and the
pruned / dense throughput ratio against the FLOPs ideal (dense FLOPs / pruned FLOPs).
Writes benchmarks/results/<stem>.{json,md,png}; the machine's load average is recorded with them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from mambaprune import compile_pruned, create_model  # noqa: E402
from mambaprune.deployment.triton import http_client, infer, start_tritonserver, write_model_repository  # noqa: E402
from mambaprune.deployment.triton.serve import PACKAGE_ROOT  # noqa: E402
from mambaprune.runtime.timing import cpu_description  # noqa: E402

HOST = "127.0.0.1"   # loopback only: the server listens there and every request goes there


def summary(latencies_s: list, images: int, seconds: float) -> dict:
    """Throughput and latency percentiles (nearest rank) of one model's requests."""
    ms = np.sort(np.asarray(latencies_s, dtype=float)) * 1e3
    rank = lambda q: ms[max(0, int(np.ceil(q * len(ms))) - 1)]  # noqa: E731
    return {"requests": len(ms), "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "p50_ms": float(rank(0.50)), "p99_ms": float(rank(0.99)), "mean_ms": float(ms.mean())}


def load_phase(url: str, model: str, x: np.ndarray, clients: int, duration: float, max_requests: int) -> tuple:
    """Closed-loop load: `clients` threads send x back to back; (latencies in s, images, wall s)."""
    latencies, lock, stop_at = [], threading.Lock(), time.monotonic() + duration
    budget = [max_requests]

    def client_loop():
        client = http_client(url, timeout=max(60.0, 4 * duration))
        while time.monotonic() < stop_at:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            start = time.perf_counter()
            infer(client, model, x)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, len(latencies) * len(x), time.perf_counter() - began


def build(args) -> dict:
    torch.manual_seed(0)
    model = create_model(args.model, **args.overrides).eval()
    return {"dense": compile_pruned(model, ratio=0.0), "pruned": compile_pruned(model, ratio=args.ratio)}


def run(args) -> dict:
    variants = build(args)
    folder = Path(tempfile.mkdtemp(prefix="serve_triton_bench_"))
    (folder / "models").mkdir()
    for name, pruned in variants.items():
        write_model_repository(pruned, folder / "models", name, max_batch_size=args.max_batch_size, instances=args.instances,
                               max_queue_delay_us=args.queue_delay_us, threads=args.threads,
                               python_path=(PACKAGE_ROOT,))
    shape = variants["dense"]._input_spec[0][0]
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).numpy()
    load_before = os.getloadavg()
    raw = {name: {"latencies": [], "images": 0, "seconds": 0.0} for name in variants}
    with start_tritonserver(folder / "models", "dense,pruned", host=HOST, http_port=0, metrics_port=None, timeout=600,
                            workdir=folder, owns_workdir=True) as server:
        client = http_client(server.url)
        for name, pruned in variants.items():   # correctness first, then warm-up
            with torch.no_grad():
                error = float(np.abs(infer(client, name, x)[0] - pruned(torch.from_numpy(x)).numpy()).max())
            raw[name]["max_abs_error"] = error
            load_phase(server.url, name, x, args.clients, args.warmup, args.max_requests)
        for _ in range(args.rounds):
            for name in variants:
                latencies, images, seconds = load_phase(server.url, name, x, args.clients, args.duration,
                                                        args.max_requests)
                raw[name]["latencies"] += latencies
                raw[name]["images"] += images
                raw[name]["seconds"] += seconds
    rows = {name: {**summary(r["latencies"], r["images"], r["seconds"]), "max_abs_error": r["max_abs_error"]}
            for name, r in raw.items()}
    report = variants["pruned"].report
    ideal = report.dense_flops / report.pruned_flops
    speedup = rows["pruned"]["images_per_s"] / rows["dense"]["images_per_s"]
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_description(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "settings": {
                k: v for k, v in vars(args).items() if k not in ("out",)},
            "flops": {"dense": report.dense_flops, "pruned": report.pruned_flops, "achieved_ratio": report.achieved_ratio},
            "rows": rows, "throughput_speedup": speedup, "flops_ideal": ideal, "share_of_ideal": speedup / ideal}


def write(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["settings"]
    lines = [f"# Triton serving, dense vs pruned ({'SMOKE RUN: checks the script, not a measurement' if s['smoke'] else 'load test'})",
             "", f"{result['date']}; {result['cpu']}; load average before {result['load_average_before'][0]:.2f}, "
             f"after {result['load_average_after'][0]:.2f}", "", f"`{result['command']}`", "",
             f"Model {s['model']} {s['overrides']}, ratio {s['ratio']} (FLOPs -{100 * result['flops']['achieved_ratio']:.1f}%), "
             f"{s['clients']} clients, batch {s['batch']} per request, {s['rounds']} x {s['duration']} s per model; "
             f"server: python backend, max_batch_size {s['max_batch_size']}, queue delay {s['queue_delay_us']} us, "
             f"{s['instances']} instance(s) x {s['threads']} thread(s), 127.0.0.1.", "",
             "| model | requests | images/s | p50 ms | p99 ms | max abs error vs PyTorch |", "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['requests']} | {row['images_per_s']:.2f} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['max_abs_error']:.1e} |")
    lines += ["", f"Throughput pruned / dense {result['throughput_speedup']:.2f}x; FLOPs ideal {result['flops_ideal']:.2f}x; "
              f"share of the ideal {result['share_of_ideal']:.2f} (target >= 0.9)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(result, stem.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    rows = [result["rows"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [r["images_per_s"] for r in rows], color=["tab:gray", "tab:blue"])
    left.set_ylabel("images / s")
    left.set_title(f"throughput ({result['throughput_speedup']:.2f}x, ideal {result['flops_ideal']:.2f}x)")
    at = np.arange(len(names))
    right.bar(at - 0.2, [r["p50_ms"] for r in rows], 0.4, label="p50")
    right.bar(at + 0.2, [r["p99_ms"] for r in rows], 0.4, label="p99")
    right.set_xticks(at, names)
    right.set_ylabel("latency (ms)")
    right.legend()
    fig.suptitle(f"Triton, {result['settings']['clients']} clients" + (" (smoke)" if result["settings"]["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_t")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="dense/pruned phases, alternating")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed seconds of load per model first")
    parser.add_argument("--max-requests", type=int, default=20000, help="bound on the requests of one phase")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per instance")
    parser.add_argument("--smoke", action="store_true", help="tiny ViM, 2 clients, 2 s phases: checks the script")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/serve_triton)")
    args = parser.parse_args(argv)
    args.overrides = {"img_size": args.img_size}
    if args.smoke:
        args.overrides = {"img_size": 64, "depth": 4, "embed_dim": 64, "num_classes": 10}
        args.clients, args.duration, args.rounds, args.warmup, args.max_requests = 2, 2.0, 1, 1.0, 200
        args.threads = 1
    args.out = args.out or ROOT / "results" / ("serve_triton_smoke" if args.smoke else "serve_triton")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    result = run(args)
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
