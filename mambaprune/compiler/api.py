"""`compile_pruned`: capture -> analyse -> plan -> rewrite -> verify -> lower."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..errors import UnsupportedModelError
from ..passes.annotate_flops import annotate_flops, total_flops
from ..passes.prune_tokens import SiteSpec, prune_tokens
from .analysis import analyse
from .auto_alignment import AlignmentSearch, search_alignment
from .auto_schedule import Calibration, ScheduleSearch, calibration_inputs, search_schedule
from .capture import Capture, capture, flat_inputs, infer_example_inputs, run_graph
from .plan import make_plan, node_flops
from .pruned_model import PrunedModel
from .report import BlockReport, PruneReport
from .settings import DEFAULT_METRIC, PruneSettings

VERIFY_TOLERANCE = 1e-4


def compile_pruned(model: torch.nn.Module, ratio: float = 0.3, example_inputs: Optional[tuple] = None, *,
                   schedule=None, alignment: str = "hold", metric: str = DEFAULT_METRIC, backend: str = "eager",
                   verify: bool = True, calibration: Optional[Iterable] = None,
                   stage_fill: str = "carry") -> PrunedModel:
    """Prune tokens of a vision state-space model; returns a module with the model's call signature.

    Args:
        model: any nn.Module whose selective scans mambaprune can see (mambaprune.selective_scan,
            mamba_ssm / mambapy entry points, or functions declared with `register_scan`).
        ratio: fraction of the model's FLOPs to remove, in [0, 1).
        example_inputs: a tuple of inputs; inferred from `patch_embed.img_size`, `img_size` or
            `default_cfg["input_size"]` when omitted.
        schedule: None or "paper" (ToP's sites after blocks 5, 10, 15 of 24, scaled to the depth, one
            keep rate solved for `ratio`), "uniform" (a site after every block, one keep rate),
            "auto" (searched on `calibration`, see below), "top" (ToP's: keep 0.8 at its sites,
            ignores `ratio`) or {k: keep_rate} (a site after the first k blocks).
        alignment: "hold" (default), "decay", "none" or "none-unsorted" (DESIGN.md), or "auto":
            the one of hold / none / decay whose outputs stay closest to the dense model's on
            `calibration` (which alignment is best depends on the model: README, "Fidelity").
        metric: token importance at each site: "novelty" (default: the distance of a token of the
            stream crossing the site from the sample's mean token), or read from the SSM output y
            of the block before the site: "novelty-y" (the same distance on y), "clip" (ToP's),
            "l1", "l2", "raw", "random", "delta" (the scans' step sizes) or a callable
            (y, token_dim) -> scores (B, L).
        backend: "eager", "inductor" (torch.compile), "onnxruntime" (the ONNX export run by an
            onnxruntime InferenceSession, CUDA provider first when available) or "tensorrt"
            (torch-tensorrt, our custom ops kept in PyTorch; needs a model compiled on CUDA).
        verify: check on the example inputs that the rewritten graph with every token kept
            reproduces the model (guards against silently wrong rewrites of unfamiliar models).
        calibration: with schedule="auto" and/or alignment="auto" (and only then), a few batches
            of model inputs (each a tensor or a tuple of positional inputs); the schedule (a greedy
            per-block sensitivity search, ToP's sites and uniform sites) and alignment whose outputs
            stay closest to the dense model's on them win.
        stage_fill: hierarchical models (stages with downsampling between them): what the pruned
            cells of a stage's grid hold when the grid is restored before the downsampling:
            "carry" (default: the value at the site where the cell was pruned) or "zeros".

    Example::

        >>> from mambaprune import compile_pruned, create_model
        >>> fast = compile_pruned(create_model("vim_t"), ratio=0.3)
        >>> print(fast.report)
    """
    settings = PruneSettings(ratio=ratio, schedule=schedule, alignment=alignment, metric=metric, backend=backend,
                             verify=verify, stage_fill=stage_fill)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_pruned expects a torch.nn.Module; got {type(model).__name__}")
    if settings.needs_calibration != (calibration is not None):
        raise ValueError("schedule='auto' / alignment='auto' and calibration= go together: pass "
                         "calibration=[a few input batches] with schedule='auto' or alignment='auto' (and only then)")
    require_backend(settings.backend)
    prepared = prepare(model, example_inputs)
    return build(prepared, settings, calibration)


@dataclass
class Prepared:
    """A captured and analysed model: everything that does not depend on the prune settings."""

    captured: Capture
    analysis: object
    flops: dict
    flat: list
    example_inputs: tuple


def prepare(model: torch.nn.Module, example_inputs: Optional[tuple] = None) -> Prepared:
    """Capture and analyse ``model`` once; ``build`` then makes pruned models from it for any settings."""
    example_inputs = _as_tuple(example_inputs) if example_inputs is not None else infer_example_inputs(model)
    captured = capture(model, example_inputs)
    analysis = analyse(captured.gm)
    if not analysis.blocks:
        raise UnsupportedModelError(no_scan_message(model, captured.routed))
    flat = flat_inputs(_first_sample(example_inputs))
    flops = node_flops(annotate_flops(captured.gm, flat).graph_module)
    return Prepared(captured, analysis, flops, flat, example_inputs)


def build(prepared: Prepared, settings: PruneSettings, calibration: Optional[Iterable] = None) -> PrunedModel:
    """Plan, rewrite, verify and wrap a prepared model (see ``compile_pruned``)."""
    captured, analysis = prepared.captured, prepared.analysis
    search, alignment_search, alignment = None, None, settings.alignment
    if settings.alignment == "auto":
        alignment_search = _search_alignment(prepared, settings, calibration)
        plan, search, alignment = alignment_search.plan, alignment_search.schedule_search, alignment_search.chosen
    elif settings.schedule == "auto":
        search = _search_schedule(prepared, settings, calibration)
        plan = search.plans[search.chosen]
    else:
        plan = make_plan(analysis, prepared.flops, settings.ratio, settings.schedule)
    sites = [SiteSpec(key, k) for key, k in sorted(plan.kept.items())]
    pruned = prune_tokens(captured.gm, analysis, sites, alignment, settings.metric,
                          settings.stage_fill).graph_module
    if settings.verify and sites:
        verify_rewrite(captured, analysis, sites, prepared.flat, settings.stage_fill)
    report = PruneReport(
        blocks=[BlockReport(b.index, b.name, b.mixing, t) for b, t in zip(analysis.blocks, plan.tokens_per_block)],
        sites=dict(plan.kept), keep_rates=dict(plan.keeps), token_length=analysis.token_length,
        protected=sorted(analysis.protected), dense_flops=plan.dense_flops,
        pruned_flops=total_flops(annotate_flops(pruned, prepared.flat).graph_module) if sites else plan.dense_flops,
        estimated_flops=plan.estimated_flops, target_ratio=settings.ratio, alignment=alignment,
        metric=settings.metric, backend=settings.backend,
        not_understood=[(n.name, n.reason) for n in analysis.not_understood],
        unprunable_sites=dict(analysis.invalid_sites), routed_scans=list(captured.routed),
        schedule_search=None if search is None else (search.chosen, dict(search.scores)),
        alignment_search=None if alignment_search is None else (alignment_search.chosen, dict(alignment_search.scores)),
        site_lengths={key: analysis.site_length(key) for key in plan.kept})
    return PrunedModel(pruned, report, prepared.example_inputs, settings.backend)


def _calibration(prepared: Prepared, calibration: Iterable) -> Calibration:
    return Calibration.of(prepared.captured.gm, calibration_inputs(calibration, expected=len(prepared.flat)))


def _search_schedule(prepared: Prepared, settings: PruneSettings, calibration: Iterable) -> ScheduleSearch:
    return search_schedule(prepared.captured.gm, prepared.analysis, prepared.flops, settings.ratio,
                           _calibration(prepared, calibration), settings.alignment, settings.metric,
                           stage_fill=settings.stage_fill)


def _search_alignment(prepared: Prepared, settings: PruneSettings, calibration: Iterable) -> AlignmentSearch:
    return search_alignment(prepared.captured.gm, prepared.analysis, prepared.flops, settings.ratio,
                            settings.schedule, _calibration(prepared, calibration), settings.metric,
                            stage_fill=settings.stage_fill)


def require_backend(backend: str) -> None:
    """Fail before the slow work when the backend's optional package is missing."""
    if backend == "onnxruntime":
        from ..runtime.backends.onnxruntime_backend import require_package
        for package, module in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")):
            require_package(package, module, 'compile_pruned(backend="onnxruntime")')
    elif backend == "tensorrt":
        from ..runtime.backends.tensorrt_backend import import_torch_tensorrt
        import_torch_tensorrt()


def verify_rewrite(captured, analysis, sites: list, flat: list, stage_fill: str) -> None:
    """Every token kept + `hold` must reproduce the dense graph exactly (up to float noise)."""
    keep_all = [SiteSpec(site.key, analysis.site_length(site.key)) for site in sites]
    check = prune_tokens(captured.gm, analysis, keep_all, "hold", "clip", stage_fill).graph_module
    with torch.no_grad():
        expected = run_graph(captured.gm, flat)
        got = run_graph(check, flat)
    for e, g in zip(expected, got):
        if e.shape != g.shape or not torch.allclose(e.float(), g.float(), rtol=VERIFY_TOLERANCE,
                                                    atol=VERIFY_TOLERANCE * (1 + e.abs().max().item())):
            raise UnsupportedModelError(
                "mambaprune could not rewrite this model faithfully: with every token kept, the rewritten "
                f"graph differs from the model (max abs diff {(e.float() - g.float()).abs().max().item():.3g}). "
                "Please report the model; pass schedule= with later sites to prune only the blocks after the "
                "problem.")


def _first_sample(inputs: tuple) -> tuple:
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def no_scan_message(model: torch.nn.Module, routed: list) -> str:
    suspects = ssm_like_modules(model)
    if suspects:
        names = ", ".join(suspects[:5])
        return (f"no selective scan was found in the captured graph, but {names} hold(s) SSM parameters "
                "(A_log / D). Its scan is probably hand-written (a Python loop or a library mambaprune does not "
                "know): declare it with mambaprune.register_scan(your_scan_fn, adapter), where the adapter "
                "computes the same thing with mambaprune.selective_scan.")
    return ("no selective scan was found: mambaprune looked for mambaprune::selective_scan nodes after routing "
            "mamba_ssm (selective_scan_fn, mamba_inner_fn, bimamba_inner_fn ...), mambapy and register_scan "
            "entry points, and for modules with A_log/D parameters. Is this a state-space model? If it is, "
            "declare its scan with mambaprune.register_scan.")


def ssm_like_modules(model: torch.nn.Module) -> list:
    found = []
    for name, module in model.named_modules():
        params = {p for p, _ in module.named_parameters(recurse=False)}
        if any(p.startswith("A_log") or p == "A" or p.startswith("A_b_log") for p in params) and \
                any(p.startswith("D") for p in params):
            found.append(name or type(module).__name__)
    return found
