"""`compile_pruned`: capture -> analyse -> plan -> rewrite -> verify -> lower.

`prepare` captures and analyses a model once (everything that does not depend on the settings);
`build` makes a pruned model from a prepared one for any settings, without touching it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..analysis import AnalyseGraph, GraphAnalysis
from ..capture import Capture, as_tuple, capture, first_sample, flat_inputs, infer_example_inputs
from ..capture.diagnosis import no_scan_message
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..pass_infra import generated_code_released, run_passes
from ..planning import AnnotateFlops, make_plan, node_flops, reruns_carried_chain, total_flops
from ..rewrite import DropNoOps, PropagateMeta, PruneTokens, verify_pruned_run, verify_rewrite
from ..search import Calibration, calibration_inputs, plan_sites, search_alignment, search_schedule
from ..runtime.torch_logs import torch_logs_held
from ..settings import DEFAULT_METRIC, Alignment, Backend, PruneSettings
from .checks import calibration_batches, check_metric, unwrap_model
from .engines import engine_for
from .pruned_model import PrunedModel
from .report import BlockReport, PruneReport
from .signature import CallSignature, call_signature


def compile_pruned(model: torch.nn.Module, ratio: float = 0.3, example_inputs: Optional[tuple] = None, *,
                   schedule=None, alignment: str = "hold", metric: str = DEFAULT_METRIC, backend: str = "eager",
                   verify: bool = True, calibration: Optional[Iterable] = None,
                   fill: str = "carry", stage_fill: Optional[str] = None, reduction: str = "drop") -> PrunedModel:
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
            "l1", "l2", "raw", "random", "delta" (the scans' step sizes, averaged over channels and
            summed over the block's scans), "delta-max" (the same, the maximum over the scans) or a callable
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
        fill: what a pruned position holds where pruned tokens come back at full length: a graph
            output that carries tokens (feature maps of a detection / segmentation backbone) and, in
            hierarchical models, a stage's grid before its downsampling: "carry" (default: the value
            the token had at the site where it was pruned, through the same per-token ops as the
            kept ones), "nearest" (the nearest kept token's value) or "zeros". Values no site feeds
            (a feature map read before the first site) are the model's own, exactly.
        stage_fill: the former name of `fill` (stage ends only); still accepted.
        reduction: what happens to the pruned tokens: "drop" (default) discards them;
            "merge-nearest" / "merge-similar" average each one's stream value into the kept token
            nearest in the original positions / most similar (cosine), weighted by size as ToMe
            does. Under a merge, fill="carry" restores a pruned position with the value of the kept
            token it was merged into (ToMe's unmerge).

    Example::

        >>> from mambaprune import compile_pruned, create_model
        >>> fast = compile_pruned(create_model("vim_t"), ratio=0.3)
        >>> print(fast.report)
    """
    if stage_fill is not None:
        if fill != "carry" and fill != stage_fill:
            raise InvalidArgumentError(f"fill={fill!r} and stage_fill={stage_fill!r} disagree: pass fill= only "
                                       "(stage_fill is its former name)")
        fill = stage_fill
    settings = PruneSettings(ratio=ratio, schedule=schedule, alignment=alignment, metric=metric, backend=backend,
                             verify=verify, fill=fill, reduction=reduction)
    model = unwrap_model(model)
    if settings.needs_calibration != (calibration is not None):
        raise InvalidArgumentError("schedule='auto' / alignment='auto' and calibration= go together: pass "
                         "calibration=[a few input batches] with schedule='auto' or alignment='auto' (and only then)")
    require_backend(settings.backend)
    calibration = calibration_batches(calibration, None if example_inputs is None else as_tuple(example_inputs))
    prepared = prepare(model, example_inputs)
    return build(prepared, settings, calibration)


@dataclass
class Prepared:
    """A captured and analysed model: everything that does not depend on the prune settings."""

    captured: Capture
    analysis: GraphAnalysis
    flops: dict             # node -> MACs per image, dense
    flat: list              # the flat graph inputs of one example image
    example_inputs: tuple
    signature: Optional[CallSignature] = None   # the original forward's, with non-tensor arguments frozen


def prepare(model: torch.nn.Module, example_inputs: Optional[tuple] = None) -> Prepared:
    """Capture and analyse ``model`` once; ``build`` then makes pruned models from it for any settings."""
    example_inputs = as_tuple(example_inputs) if example_inputs is not None else infer_example_inputs(model)
    with generated_code_released() as keep:
        with torch_logs_held():   # a failed export logs its whole graph before the error says it in one line
            captured = capture(model, example_inputs)
        analysed = AnalyseGraph(captured.static_batch)
        gm = keep(run_passes([analysed], captured.gm).graph_module)
        if not analysed.result.blocks:
            raise UnsupportedModelError(no_scan_message(model, captured.recognised))
        batch = captured.static_batch or 1   # a graph with a fixed batch runs only on that batch
        flat = flat_inputs(example_inputs if captured.static_batch else first_sample(example_inputs))
        run_passes([AnnotateFlops(flat, batch)], gm)
    return Prepared(captured, analysed.result, node_flops(gm), flat, example_inputs,
                    call_signature(model, example_inputs))


def build(prepared: Prepared, settings: PruneSettings, calibration: Optional[Iterable] = None) -> PrunedModel:
    """Plan, rewrite, verify and wrap a prepared model (see ``compile_pruned``); ``prepared`` is not changed."""
    captured, analysis = prepared.captured, prepared.analysis
    with generated_code_released() as keep:
        plan, settings, schedule_search, alignment_search = choose_plan(prepared, settings, calibration)
        sites = plan_sites(plan)
        pruned, restorations = captured.gm, []
        if sites:
            prune = PruneTokens(analysis, sites, settings)
            rewritten = keep(run_passes([prune], captured.gm).graph_module)
            restorations = prune.restorations
            check_metric(rewritten, prepared.flat, settings.metric)   # before the passes that run it
            passes = [PropagateMeta(prepared.flat), AnnotateFlops(prepared.flat, captured.static_batch or 1)]
            pruned = keep(run_passes(passes, rewritten).graph_module)
        checked = None
        if settings.verify and sites:
            verify_rewrite(captured.gm, analysis, sites, prepared.flat, settings)
            checked = verify_pruned_run(captured.gm, pruned, analysis, sites, prepared.flat, settings)
        pruned = keep(run_passes([DropNoOps()], pruned).graph_module)   # what the inputs' checks make redundant
    report = PruneReport(
        blocks=[BlockReport(b.index, b.name, b.mixing, t) for b, t in zip(analysis.blocks, plan.tokens_per_block)],
        sites=dict(plan.kept), keep_rates=dict(plan.keeps), token_length=analysis.token_length,
        protected=sorted(analysis.protected), dense_flops=plan.dense_flops,
        pruned_flops=total_flops(pruned) if sites else plan.dense_flops,
        estimated_flops=plan.estimated_flops, target_ratio=settings.ratio, alignment=settings.alignment,
        metric=settings.metric, backend=settings.backend,
        not_understood=[(n.name, n.reason) for n in analysis.not_understood],
        unprunable_sites=dict(analysis.invalid_sites), routed_scans=list(captured.routed),
        recognised_scans=[str(r) for r in captured.recognised if r.reported],
        plain_subclasses=[str(u) for u in captured.unwrapped],
        schedule_search=None if schedule_search is None else (schedule_search.chosen, dict(schedule_search.scores)),
        alignment_search=None if alignment_search is None else (alignment_search.chosen, dict(alignment_search.scores)),
        site_lengths={key: analysis.site_length(key) for key in plan.kept}, static_batch=captured.static_batch,
        schedule=settings.schedule,
        frozen_arguments=prepared.signature.frozen_arguments() if prepared.signature else {},
        restorations=restorations, fill=str(settings.fill), reduction=str(settings.reduction), verified=checked)
    return PrunedModel(pruned, report, prepared.example_inputs, settings.backend, captured.static_batch,
                       prepared.signature)


def choose_plan(prepared: Prepared, settings: PruneSettings, calibration: Optional[Iterable]) -> tuple:
    """(plan, settings with the alignment chosen, schedule search or None, alignment search or None)."""
    gm, analysis, flops = prepared.captured.gm, prepared.analysis, prepared.flops
    if settings.alignment is Alignment.AUTO:
        found = search_alignment(gm, analysis, flops, settings, _calibration(prepared, calibration))
        return found.plan, settings.with_(alignment=found.chosen), found.schedule_search, found
    if settings.schedule == "auto":
        found = search_schedule(gm, analysis, flops, settings, _calibration(prepared, calibration))
        return found.plans[found.chosen], settings, found, None
    plan = make_plan(analysis, flops, settings.ratio, settings.schedule, reruns_carried_chain(settings))
    return plan, settings, None, None


def _calibration(prepared: Prepared, calibration: Iterable) -> Calibration:
    return Calibration.of(prepared.captured.gm, calibration_inputs(calibration, expected=len(prepared.flat)))


def require_backend(backend: Backend) -> None:
    """Fail before the slow work when the backend's optional package is missing."""
    engine = engine_for(backend)
    if engine is not None:
        engine.require()
