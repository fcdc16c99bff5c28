"""Command line: ``mambaprune demo | compile | report | bench | recover | serve`` (also ``python -m mambaprune``).

MODEL arguments are ``package.module:factory`` (called without arguments; it must return an
nn.Module), the name of a shipped checkpoint (``vim_digits``, ...) or of a registered architecture
(``vim_t``, ...; random weights). Errors print as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import InvalidArgumentError, MambapruneError
from .settings import ALIGNMENT_CHOICES, DEFAULT_METRIC, FILLS, METRICS, REDUCTIONS

DEMO_CHECKPOINT = "vim_digits"


def load_model_spec(spec: str, img_size: int | None = None) -> torch.nn.Module:
    """MODULE:FACTORY, a shipped checkpoint name or a registered model name -> an eval-mode module."""
    from .models import create_model, list_models
    from .models.pretrained import list_pretrained, load_pretrained

    if ":" in spec:
        if img_size:
            raise InvalidArgumentError(f"--img-size applies to registered architectures only; {spec} builds its own "
                                       "model: make the factory build it at that size (and pass --input-shape)")
        module_name, _, factory_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise InvalidArgumentError(f"cannot import module {module_name!r} named in {spec!r}: {err}") from err
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise InvalidArgumentError(f"{module_name} has no callable {factory_name!r} (MODEL is package.module:factory)")
        try:
            model = factory()
        except Exception as err:  # the user's code: its error in one line
            raise InvalidArgumentError(f"{spec}() raised {type(err).__name__}: {err}") from err
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
        return model.eval()
    if spec in list_pretrained():
        if img_size:
            raise InvalidArgumentError(f"--img-size applies to registered architectures only; the checkpoint {spec} "
                                       "has its own input size")
        return load_pretrained(spec)
    if spec in list_models():
        return create_model(spec, **({"img_size": img_size} if img_size else {})).eval()
    raise InvalidArgumentError(f"unknown model {spec!r}: use package.module:factory, a shipped checkpoint "
                     f"({', '.join(list_pretrained()) or 'none'}) or a registered model ({', '.join(list_models())})")


def _compile(args):
    from . import compile_pruned
    from .capture.inputs import infer_example_inputs
    from .data.calibration import load_calibration

    model = load_model_spec(args.model, args.img_size)
    example = None if args.input_shape is None else (torch.randn(1, *args.input_shape),)
    calibration = None if args.calibration is None else load_calibration(
        args.calibration, lambda: tuple((example or infer_example_inputs(model))[0].shape[-2:]),
        mean=args.mean, std=args.std, model=model)
    return model, compile_pruned(model, ratio=args.ratio, example_inputs=example, schedule=args.schedule,
                                 alignment=args.alignment, metric=args.metric, fill=args.fill,
                                 reduction=args.reduction, calibration=calibration)


def compile_command(args) -> None:
    """Prune MODEL and export it (.onnx / .pt2 / .engine) to -o."""
    from .deployment.export import discard_temporary, is_folder_format, reserve_temporary, resolve_format

    fmt = resolve_format(args.output, args.format)
    if not is_folder_format(fmt):
        discard_temporary(reserve_temporary(args.output))  # the folder is checked before the compile
    _, pruned = _compile(args)
    path = pruned.export(args.output, format=args.format)
    report = pruned.report
    target = f"target {report.target_ratio:.3f}" if report.uses_ratio else f"schedule {report.schedule!r}"
    size = sum(f.stat().st_size for f in [Path(path), *Path(path).rglob("*")] if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB): FLOPs reduction "
          f"{report.achieved_ratio:.3f} ({target}), {len(report.sites)} site(s)")


def recover_command(args) -> None:
    """Prune MODEL, recover it by distillation on the images of --images, export it (rank 0) to -o."""
    from . import recover
    from .api import distributed
    from .data import image_folder

    started = distributed.init_from_env()
    try:
        image_folder(args.images, 1, mean=args.mean, std=args.std, model=load_model_spec(args.model, args.img_size))
        model, pruned = _compile(args)   # the folder and the normalisation were checked before the slow work
        result = recover(pruned, model, _recovery_images(args, model, pruned), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         temperature=args.temperature, seed=args.seed, augment=args.augment)
        if distributed.rank_and_world()[0] == 0:
            record = result.report.recovery
            print(f"recovered {record.steps} steps in {record.seconds:.1f} s (final loss {record.losses[-1]:.4g}, "
                  f"from {record.losses[0]:.4g}); wrote {result.export(args.output)}")
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()


def _recovery_images(args, model, pruned):
    """--images as a path (mean / std from the model's config) or, with --mean / --std, as an image_folder."""
    if args.mean is None and args.std is None:
        return args.images
    from .data import image_folder
    return image_folder(args.images, pruned._input_spec[0][0][-2:], mean=args.mean, std=args.std,
                        batch_size=args.batch_size, model=model, shuffle=True, seed=args.seed)


def serve_command(args) -> None:
    """Prune MODEL and serve it with Triton Inference Server until Ctrl-C, SIGTERM or --duration seconds."""
    from .deployment.triton import serve

    _, pruned = _compile(args)
    with serve(pruned, host=args.host, http_port=args.http_port, metrics_port=args.metrics_port, name=args.name,
               max_batch_size=args.max_batch_size, instances=args.instances, threads=args.threads) as server:
        metrics = f", metrics {server.metrics_url}" if server.metrics_url else ""
        print(f"serving {args.model} (FLOPs -{100 * pruned.report.achieved_ratio:.1f}%) at {server.url}/v2/models/"
              f"{server.model_name}/infer (ready: {server.url}/v2/health/ready{metrics}); Ctrl-C stops", flush=True)
        server.wait(args.duration)
    print("stopped")


def _add_serve_command(commands) -> None:
    from .deployment.triton.cli import add_server_options

    run_serve = commands.add_parser("serve", help="prune MODEL and serve it with NVIDIA Triton Inference Server "
                                    "(dynamic batching, health and metrics endpoints)")
    _add_prune_options(run_serve)
    add_server_options(run_serve)
    run_serve.set_defaults(run=serve_command)


def report_command(args) -> None:
    """Print the compiler's report for MODEL at --ratio."""
    _, pruned = _compile(args)
    print(pruned.report)


def bench_command(args) -> None:
    """Eager latency of MODEL dense vs pruned at each --ratios value, on this machine."""
    from . import compile_pruned

    model = load_model_spec(args.model, args.img_size)
    example = None if args.input_shape is None else (torch.randn(1, *args.input_shape),)
    print(f"{'ratio':>6} {'FLOPs -%':>9} {'dense ms':>9} {'pruned ms':>10} {'speedup':>8} {'ideal':>6}")
    for ratio in args.ratios:
        pruned = compile_pruned(model, ratio=ratio, example_inputs=example)
        x = torch.randn(args.batch, *pruned._input_spec[0][0])
        times = _interleaved_ms(model, pruned, x, args.repeat)
        dense_ms, pruned_ms = times.ms["dense"], times.ms["pruned"]
        ideal = pruned.report.dense_flops / pruned.report.pruned_flops
        print(f"{ratio:>6.2f} {100 * pruned.report.achieved_ratio:>9.1f} {dense_ms:>9.2f} {pruned_ms:>10.2f} "
              f"{dense_ms / pruned_ms:>7.2f}x {ideal:>5.2f}x{_busy_note(times.others_cpu_share)}")


@torch.no_grad()
def _interleaved_ms(model, pruned, x, rounds: int):
    """Dense and pruned timed round robin (runtime.timing): a busy neighbour slows both alike."""
    from .runtime.timing import interleaved

    return interleaved({"dense": lambda: model(x), "pruned": lambda: pruned(x)}, rounds)


def _busy_note(share: float) -> str:
    return f"; other processes took {share:.0%} of the CPU meanwhile: unreliable" if share > 0.1 else ""


def demo(args) -> None:
    """The digits ViM pruned at --ratio: report, accuracy, timing, ONNX, picture of the kept tokens."""
    from . import compile_pruned
    from .data import make_cluttered_digits
    from .models import create_model
    from .models.pretrained import REFERENCE_CONFIGS, list_pretrained, load_pretrained
    from .visualize import plot_kept_tokens

    torch.manual_seed(0)
    factory, overrides, variant = REFERENCE_CONFIGS[DEMO_CHECKPOINT]
    trained = DEMO_CHECKPOINT in list_pretrained()
    if trained:
        model = load_pretrained(DEMO_CHECKPOINT)
        print(f"{DEMO_CHECKPOINT}: {factory}{overrides}, trained on cluttered digits")
    else:
        model = create_model(factory, **overrides).eval()
        print(f"{DEMO_CHECKPOINT}: {factory}{overrides} with RANDOM weights: no trained checkpoint is shipped "
              "(benchmarks/train_reference.py trains one), so accuracies below are not meaningful")
    img_size = overrides["img_size"]
    test = make_cluttered_digits("test", args.images, variant, img_size, seed=0)
    # alignment="auto" is chosen on validation images: a split the test accuracy below never sees
    calibration = None
    if args.alignment == "auto":
        val = make_cluttered_digits("val", 64, variant, img_size, seed=1)
        calibration = [x for x, _ in val.batches(32)]
    start = time.perf_counter()
    pruned = compile_pruned(model, ratio=args.ratio, example_inputs=(test.inputs[:2],), alignment=args.alignment,
                            calibration=calibration)
    print(f"\ncompile_pruned(ratio={args.ratio}, alignment={args.alignment!r}"
          f"{', calibration=64 validation images' if calibration else ''}) in {time.perf_counter() - start:.1f} s")
    print(pruned.report)

    with torch.no_grad():
        dense_logits = torch.cat([model(x) for x, _ in test.batches(100)])
        pruned_logits = torch.cat([pruned(x) for x, _ in test.batches(100)])
    accuracy = {name: (logits.argmax(-1) == test.labels).float().mean().item()
                for name, logits in (("dense", dense_logits), ("pruned", pruned_logits))}
    agreement = (dense_logits.argmax(-1) == pruned_logits.argmax(-1)).float().mean().item()
    print(f"\ntest accuracy on {len(test)} cluttered-digit images: dense {accuracy['dense']:.3f}, pruned "
          f"{accuracy['pruned']:.3f} (pruned predictions agree with dense on {agreement:.3f})")

    batch = test.inputs[:32]
    times = _interleaved_ms(model, pruned, batch, 5)
    dense_ms, pruned_ms = times.ms["dense"], times.ms["pruned"]
    print(f"CPU eager, batch 32 ({torch.get_num_threads()} threads, best of 5 interleaved rounds): dense "
          f"{dense_ms:.0f} ms, pruned {pruned_ms:.0f} ms ({dense_ms / pruned_ms:.2f}x; ideal "
          f"{pruned.report.dense_flops / pruned.report.pruned_flops:.2f}x){_busy_note(times.others_cpu_share)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        onnx_path = Path(pruned.export(out / f"{DEMO_CHECKPOINT}_pruned.onnx"))
        print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB)" + _onnx_check(onnx_path, batch[:8], pruned))
    except ImportError as err:
        print(f"ONNX export skipped: {err}")
    shown = make_cluttered_digits("test", 4, variant, img_size, seed=0)
    picture = plot_kept_tokens(shown.pictures(), pruned.kept_positions(shown.inputs), pruned.report,
                               out / "kept_tokens.png", titles=[f"label {int(v)}" for v in shown.labels])
    print(f"kept tokens drawn over 4 test images: {picture}")


def _onnx_check(path: Path, x: torch.Tensor, pruned) -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return ""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        diff = (got - pruned(x)).abs().max().item()
    return f"; onnxruntime matches PyTorch to {diff:.1e}"


def _add_prune_options(command) -> None:
    command.add_argument("model", help="package.module:factory, a shipped checkpoint or a registered model name")
    command.add_argument("--ratio", type=float, default=0.3, help="fraction of FLOPs to remove (default 0.3)")
    command.add_argument("--schedule", default="paper", choices=("paper", "uniform", "top", "auto"),
                         help="'auto' is searched on --calibration")
    command.add_argument("--alignment", default="hold", choices=ALIGNMENT_CHOICES,
                         help="'auto' is chosen on --calibration")
    command.add_argument("--calibration", default=None, metavar="FILE_OR_DIR",
                         help="a folder of images (read like --images) or a .pt or .safetensors file of one tensor "
                              "of input images (N, C, H, W), for --schedule auto / --alignment auto (batches of 8)")
    for name in ("mean", "std"):
        command.add_argument(f"--{name}", type=float, nargs=3, default=None,
                             help=f"per-channel {name} of images in [0, 1] for folders of images (default: the "
                                  "model's pretrained_cfg)")
    command.add_argument("--input-shape", type=input_shape, default=None, metavar="C,H,W",
                         help="example input shape without the batch (default: what the model declares)")
    command.add_argument("--metric", default=DEFAULT_METRIC, choices=METRICS)
    command.add_argument("--fill", "--stage-fill", dest="fill", default="carry", choices=FILLS,
                         help="what pruned positions hold where tokens are restored (token outputs such as feature "
                              "maps, a stage's grid before its downsampling)")
    command.add_argument("--reduction", default="drop", choices=REDUCTIONS, help="drop the pruned tokens, or "
                         "average each into the nearest / most similar kept token (merge-nearest / merge-similar)")
    command.add_argument("--img-size", type=positive_int, default=None,
                         help="input size for registered architectures (an error for MODULE:FACTORY and checkpoints)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def input_shape(text: str) -> tuple:
    """'3,224,224' -> (3, 224, 224)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 3,224,224; got {text!r}")
    return shape


def _add_recover_command(commands) -> None:
    from .api.augment import AUGMENTS
    from .api.recover import (
        DEFAULT_AUGMENT,
        DEFAULT_BATCH_SIZE,
        DEFAULT_LR,
        DENSE_LR,
        DEFAULT_STEPS,
        DEFAULT_TEMPERATURE,
    )

    run_recover = commands.add_parser("recover", help="prune MODEL, recover it by distillation on unlabelled images, "
                                      "export it (several processes with torchrun)")
    _add_prune_options(run_recover)
    run_recover.add_argument("--images", required=True, help="a folder of images (any depth; any format Pillow reads)")
    run_recover.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    run_recover.add_argument("--lr", type=float, default=None,
                             help=f"peak learning rate (default: {DENSE_LR} for output maps distilled channel-wise, "
                                  f"else {DEFAULT_LR})")
    run_recover.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="global batch (all processes)")
    run_recover.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    run_recover.add_argument("--seed", type=int, default=0)
    run_recover.add_argument("--augment", choices=AUGMENTS, default=DEFAULT_AUGMENT,
                             help="augment every batch, the dense and the pruned model seeing the same images "
                             f"(default {DEFAULT_AUGMENT})")
    run_recover.add_argument("-o", "--output", required=True, help="model.onnx, model.pt2 or model.engine")
    run_recover.set_defaults(run=recover_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambaprune", description="Token pruning for vision state-space models")
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="prune the digits ViM: report, accuracy, speed, ONNX, picture")
    run_demo.add_argument("--ratio", type=float, default=0.3)
    run_demo.add_argument("--images", type=int, default=300, help="test images to score")
    run_demo.add_argument("--alignment", default="auto", choices=ALIGNMENT_CHOICES,
                          help="'auto' (default here): chosen on 64 validation images; see the README's Fidelity section")
    run_demo.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "mambaprune_demo"),
                          help="folder for the ONNX file and the picture")
    run_demo.set_defaults(run=demo)
    run_compile = commands.add_parser("compile", help="prune MODEL and export it")
    _add_prune_options(run_compile)
    run_compile.add_argument("-o", "--output", required=True,
                             help="model.onnx, model.pt2 or model.engine; a folder with --format triton")
    run_compile.add_argument("--format", default=None,
                             help="export format when the suffix does not say it: aoti (a .pt2 AOTInductor package) "
                                  "or triton (a Triton Inference Server model repository folder, model name "
                                  "'mambaprune')")
    run_compile.set_defaults(run=compile_command)
    run_report = commands.add_parser("report", help="print what pruning MODEL would do")
    _add_prune_options(run_report)
    run_report.set_defaults(run=report_command)
    _add_recover_command(commands)
    _add_serve_command(commands)
    run_bench = commands.add_parser("bench", help="dense vs pruned eager latency on this machine")
    run_bench.add_argument("model", help="package.module:factory, a shipped checkpoint or a registered model name")
    run_bench.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    run_bench.add_argument("--batch", type=positive_int, default=8)
    run_bench.add_argument("--repeat", type=positive_int, default=5)
    run_bench.add_argument("--img-size", type=positive_int, default=None)
    run_bench.add_argument("--input-shape", type=input_shape, default=None, metavar="C,H,W",
                           help="example input shape without the batch (default: what the model declares)")
    run_bench.set_defaults(run=bench_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, ImportError, OSError, KeyError, MambapruneError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mambaprune: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
