"""Which ONNX form of the selective scan is fastest in ONNX Runtime (CPU), and why.

1. The scan alone at ViM-T's shape (D=384 channels, N=16 states, L=197 tokens; D, z, delta_bias with
   softplus, as ViM calls it): PyTorch's op (the C++ kernel) against ONNX Runtime running each form
   (onnx_ops.SCAN_FORMS), batches 1 and 8, interleaved round robin.
2. ONNX Runtime's profiler on the scan alone, per form: time per op type (the nodes of a Scan body
   included), so the cost of the loop machinery is seen next to the arithmetic.
3. The whole model (ViM-T 224): the user's eager model, the eager pruned graph at ratio 0 and each
   pruned ratio, and ONNX Runtime running the exports of the same graphs in each form; the
   speed-ups of the pruned exports against the ratio-0 export of the same form, and the FLOPs ideal.

    python benchmarks/onnx_scan.py                 # all three parts
    python benchmarks/onnx_scan.py --quick         # a 4-block ViM at 64 px, 2 rounds: checks the script

Writes benchmarks/results/onnx_scan.json and .md (--quick: onnx_scan_quick.*).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import onnxruntime as ort  # noqa: E402

import mambaprune  # noqa: E402
from mambaprune import compile_pruned  # noqa: E402
from mambaprune.deployment import onnx_ops  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.runtime import timing  # noqa: E402

FULL = dict(dim=384, dstate=16, length=197, batches=(1, 8), rounds=5, model={"img_size": 224}, ratios=(0.3, 0.5))
QUICK = dict(dim=32, dstate=4, length=37, batches=(1, 2), rounds=2,
             model={"img_size": 64, "depth": 4, "embed_dim": 32}, ratios=(0.3,))


class ViMScan(torch.nn.Module):
    """The scan as ViM calls it: D, z, delta_bias with softplus; the arguments random but fixed."""

    def __init__(self, dim: int, dstate: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(-torch.arange(1, dstate + 1.0).repeat(dim, 1))  # S4D-real, as ViM
        self.D = torch.nn.Parameter(torch.ones(dim))
        self.delta_bias = torch.nn.Parameter(torch.rand(dim, generator=g) * 0.1 - 4.0)

    def forward(self, u, delta, B, C, z):
        return mambaprune.selective_scan(u, delta, self.A, B, C, self.D, z, self.delta_bias, True)


def scan_inputs(batch: int, dim: int, dstate: int, length: int) -> tuple:
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, length, generator=g),
            torch.randn(batch, dstate, length, generator=g), torch.randn(batch, dstate, length, generator=g),
            torch.randn(batch, dim, length, generator=g))


def export_scan(module, example: tuple, form: str, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, example, dynamic_shapes=tuple({0: batch} for _ in example))
    torch.onnx.export(program, dynamo=True, opset_version=onnx_ops.ONNX_OPSET,
                      custom_translation_table=onnx_ops.custom_translation_table(form)).save(str(path),
                                                                                              external_data=False)
    return path


def session(path: Path, profile_prefix: str = None) -> ort.InferenceSession:
    """A CPU session whose idle threads do not spin: spinning threads would steal the CPU from the
    PyTorch variant timed next (measured here: no effect on ONNX Runtime's own times)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def feeds(sess, arrays) -> dict:
    return {i.name: a.numpy() for i, a in zip(sess.get_inputs(), arrays)}


def profile_by_op(path: Path, arrays, runs: int, folder: Path) -> dict:
    """{op: [us per run, calls per run]} from ONNX Runtime's profiler (one untimed run first, dropped).
    Nodes of a Scan body (named mambaprune_*, see onnx_ops) are listed as "body <op>"; the Scan node's
    own time less its body's is "Scan loop (less body)": the loop machinery."""
    sess = session(path, str(folder / f"profile_{path.stem}"))
    feed = feeds(sess, arrays)
    sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    first_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else -1
    totals = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < first_end:
            continue
        op = event.get("args", {}).get("op_name", "?")
        key = f"body {op}" if event["name"].startswith("mambaprune_") else op
        totals[key][0] += event["dur"]
        totals[key][1] += 1
    body = sum(us for key, (us, _) in totals.items() if key.startswith("body "))
    if "Scan" in totals:
        scan_us, calls = totals.pop("Scan")
        totals["Scan loop (less body)"] = [scan_us - body, calls]
    return {op: [round(us / runs, 1), round(n / runs)] for op, (us, n) in
            sorted(totals.items(), key=lambda kv: -kv[1][0])}


def scan_part(cfg: dict, folder: Path) -> dict:
    module = ViMScan(cfg["dim"], cfg["dstate"]).eval()
    example = scan_inputs(2, cfg["dim"], cfg["dstate"], cfg["length"])
    paths = {form: export_scan(module, example, form, folder / f"scan_{form}.onnx") for form in onnx_ops.SCAN_FORMS}
    rows, profiles = [], {}
    for batch in cfg["batches"]:
        arrays = scan_inputs(batch, cfg["dim"], cfg["dstate"], cfg["length"])
        with torch.no_grad():
            reference = module(*arrays)
        sessions = {label: session(p) for label, p in paths.items()}
        errors = {label: float((torch.from_numpy(s.run(None, feeds(s, arrays))[0]) - reference).abs().max())
                  for label, s in sessions.items()}
        calls = {"pytorch op": lambda: module(*arrays)}
        calls.update({label: (lambda s=s, f=feeds(s, arrays): s.run(None, f)) for label, s in sessions.items()})
        with torch.no_grad():
            result = timing.interleaved(calls, rounds=cfg["rounds"], fill_ms=200.0, attempts=2)
        rows.append({"batch": batch, "ms": result.ms, "max_abs_error": errors,
                     "others_cpu_share": result.others_cpu_share})
        if batch == cfg["batches"][0]:
            profiles = {label: profile_by_op(p, arrays, 5, folder) for label, p in paths.items()}
    return {"rows": rows, "profiles_batch": cfg["batches"][0], "profiles": profiles}


def model_part(cfg: dict, folder: Path, forms: list) -> dict:
    model = create_model("vim_t", **cfg["model"]).eval()
    size = cfg["model"]["img_size"]
    example = (torch.randn(2, 3, size, size),)
    pruned = {ratio: compile_pruned(model, ratio=ratio, example_inputs=example) for ratio in (0.0, *cfg["ratios"])}
    paths, export_s = {}, {}
    for form in forms:
        for ratio, p in pruned.items():
            start = time.perf_counter()
            paths[form, ratio] = p.export(folder / f"vim_{form}_{ratio}.onnx", scan_form=form)
            export_s[f"{form} / {ratio}"] = round(time.perf_counter() - start, 1)
    rows = []
    for batch in cfg["batches"]:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        sessions = {key: session(p) for key, p in paths.items()}
        calls = {"eager model": lambda: model(x)}
        calls.update({f"eager pruned {r}": (lambda p=p: p(x)) for r, p in pruned.items()})
        calls.update({f"ort {label} {r}": (lambda s=s, f={s.get_inputs()[0].name: x.numpy()}: s.run(None, f))
                      for (label, r), s in sessions.items()})
        with torch.no_grad():
            errors = {f"ort {label} {r}": float((torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
                                                 - pruned[r](x)).abs().max()) for (label, r), s in sessions.items()}
            result = timing.interleaved(calls, rounds=cfg["rounds"], attempts=2)
        rows.append({"batch": batch, "ms": result.ms, "max_abs_error_vs_pruned": errors,
                     "others_cpu_share": result.others_cpu_share})
    ideal = {r: round(p.report.dense_flops / p.report.pruned_flops, 3) for r, p in pruned.items()}
    return {"ratios": [0.0, *cfg["ratios"]], "forms": list(forms), "ideal": ideal,
            "export_s": export_s, "rows": rows}


def markdown(payload: dict) -> str:
    scan, lines = payload["scan"], [
        "# The selective scan in ONNX Runtime, form by form", "",
        f"{payload['when']}; {payload['machine']}; onnxruntime {payload['onnxruntime']} CPUExecutionProvider", "",
        f"`{payload['command']}`", ""]
    if scan:
        cfg = payload["config"]
        lines += [f"## The scan alone (D={cfg['dim']}, N={cfg['dstate']}, L={cfg['length']}), ms, best of "
                  f"{cfg['rounds']} rounds", "", "| batch | " + " | ".join(scan["rows"][0]["ms"]) + " | others' CPU |",
                  "|---" * (len(scan["rows"][0]["ms"]) + 2) + "|"]
        for row in scan["rows"]:
            lines.append(f"| {row['batch']} | " + " | ".join(f"{v:.2f}" for v in row["ms"].values())
                         + f" | {row['others_cpu_share']:.0%} |")
        worst = max(e for row in scan["rows"] for e in row["max_abs_error"].values())
        lines += ["", f"Largest difference from the PyTorch op over all forms and batches: {worst:.1e}.", "",
                  f"### ONNX Runtime profile, batch {scan['profiles_batch']}: us per run by op type (calls)", ""]
        for label, ops in scan["profiles"].items():
            total = sum(us for us, _ in ops.values())
            top = ", ".join(f"{op} {us:.0f} ({n})" for op, (us, n) in list(ops.items())[:8])
            lines.append(f"- **{label}**: {total:.0f} us in kernels; {top}")
    model = payload["model"]
    if model:
        lines += ["", "## ViM-T, whole model, ms (best of rounds, every variant of a batch interleaved)", "",
                  "| batch | variant | ms | vs eager model | speed-up vs its ratio 0 | ideal | of ideal |",
                  "|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            ms = row["ms"]
            for key, value in ms.items():
                ratio = float(key.rsplit(" ", 1)[1]) if key != "eager model" else None
                base = key.rsplit(" ", 1)[0] + " 0.0" if ratio is not None else None
                speed = ms[base] / value if ratio else None
                ideal = model["ideal"][ratio] if ratio else None
                lines.append(f"| {row['batch']} | {key} | {value:.1f} | {ms['eager model'] / value:.2f}x | "
                             + (f"{speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} |" if ratio else "| | |"))
            lines.append(f"| {row['batch']} | (others' CPU share) | {row['others_cpu_share']:.0%} | | | | |")
        worst = max(e for row in model["rows"] for e in row["max_abs_error_vs_pruned"].values())
        lines += ["", f"ONNX Runtime against the PyTorch pruned graph of the same ratio: max abs difference {worst:.1e}.",
                  f"Export seconds: {model['export_s']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", nargs="+", default=["scan", "model"], choices=["scan", "model"])
    parser.add_argument("--model-forms", nargs="+", default=["scan"], choices=onnx_ops.SCAN_FORMS,
                        help="scan forms of part 3")
    parser.add_argument("--out", help="results stem (default onnx_scan, --quick: onnx_scan_quick)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    command = "python benchmarks/onnx_scan.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    with tempfile.TemporaryDirectory(prefix="mambaprune-onnx-scan-") as tmp:
        folder = Path(tmp)
        scan = scan_part(cfg, folder) if "scan" in args.parts else None
        model = model_part(cfg, folder, args.model_forms) if "model" in args.parts else None
    payload = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": timing.cpu_description(),
               "onnxruntime": ort.__version__, "command": command, "config": {k: v for k, v in cfg.items()},
               "scan": scan, "model": model}
    stem = ROOT / "results" / (args.out or ("onnx_scan_quick" if args.quick else "onnx_scan"))
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
