"""reduction="merge-nearest" / "merge-similar" (rewrite/merge.py, runtime/token_merge.py): the pruned tokens'
stream values averaged into kept tokens, size-weighted; ToMe's unmerge under fill="carry"; and the
step-size metrics ("delta", "delta-max") against a direct implementation of their definition."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mambaprune import compile_pruned, create_model
from mambaprune.api.compile import build, prepare
from mambaprune.capture import run_graph
from mambaprune.errors import InvalidArgumentError
from mambaprune.models.vim import causal_conv1d
from mambaprune.pass_infra import run_passes
from mambaprune.rewrite import PruneTokens
from mambaprune.rewrite.prune_tokens import SiteSpec
from mambaprune.runtime import token_merge as tm
from mambaprune.settings import PruneSettings, Reduction
from tests.dense_models import vim_features

MERGES = ("merge-nearest", "merge-similar")
SITE = 6


# ------------------------------------------------------------------------------ the op, by its definition
def direct_merge(x, sel, pruned, target, size):
    """The module docstring's formula, token by token (x: (B, P, C), size: (B, P))."""
    out = torch.zeros(x.shape[0], sel.shape[1], x.shape[2], dtype=torch.float64)
    total = torch.zeros(x.shape[0], sel.shape[1], dtype=torch.float64)
    for b in range(x.shape[0]):
        for k, slot in enumerate(sel[b].tolist()):
            out[b, k] += size[b, slot] * x[b, slot].double()
            total[b, k] += size[b, slot]
        for j, slot in enumerate(pruned[b].tolist()):
            k = target[b, j].item()
            out[b, k] += size[b, slot] * x[b, slot].double()
            total[b, k] += size[b, slot]
    return out / total.unsqueeze(-1), total


def random_split(batch, length, keep, seed):
    g = torch.Generator().manual_seed(seed)
    sel = torch.stack([torch.randperm(length, generator=g)[:keep].sort().values for _ in range(batch)])
    return sel, tm.pruned_slots(sel, length)


def test_pruned_slots_are_the_complement():
    sel, pruned = random_split(3, 11, 4, 0)
    for b in range(3):
        assert sorted(sel[b].tolist() + pruned[b].tolist()) == list(range(11))
        assert pruned[b].tolist() == sorted(pruned[b].tolist())


@pytest.mark.parametrize("sized", [False, True])
def test_merge_equals_the_definition(sized):
    batch, length, keep, channels = 2, 9, 4, 5
    sel, pruned = random_split(batch, length, keep, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, length, channels, generator=g)
    target = torch.randint(0, keep, pruned.shape, generator=g)
    size = torch.randint(1, 4, (batch, length), generator=g).float() if sized else None
    merged_size = tm.merged_sizes(size, sel, pruned, target)
    got = tm.merge_tokens(x, sel, pruned, target, size, merged_size, 1)
    expected, total = direct_merge(x, sel, pruned, target, size if sized else torch.ones(batch, length))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_size.double(), total)
    # channels-first, token axis last: the same numbers
    got_t = tm.merge_tokens(x.transpose(1, 2), sel, pruned, target, size, merged_size, 2)
    torch.testing.assert_close(got_t.transpose(1, 2), got)


def test_targets_equal_the_definition():
    batch, length, keep = 2, 12, 5
    sel, pruned = random_split(batch, length, keep, 3)
    prev_idx = torch.arange(length).expand(batch, length) * 2          # original positions 0, 2, 4, ...
    protected = torch.tensor([2 * sel[0, 0].item()])                    # sample 0's first kept token
    coords = torch.stack([torch.arange(2 * length) // 5, torch.arange(2 * length) % 5], 1).float()  # a 5-wide grid
    stream = torch.randn(batch, 3, length, generator=torch.Generator().manual_seed(4))  # token axis 2
    nearest = tm.nearest_targets(prev_idx, sel, pruned, coords, protected)
    similar = tm.similar_targets(stream, 2, prev_idx, sel, pruned, protected)
    for b, j in itertools.product(range(batch), range(length - keep)):
        p = pruned[b, j].item()
        candidates = [k for k in range(keep) if 2 * sel[b, k].item() not in protected.tolist()]
        dist = {k: ((coords[2 * p] - coords[2 * sel[b, k]]) ** 2).sum().item() for k in candidates}
        best = min(dist.values())
        assert nearest[b, j].item() == min(k for k in candidates if dist[k] == best)
        cos = {k: F.cosine_similarity(stream[b, :, p], stream[b, :, sel[b, k]], dim=0).item() for k in candidates}
        assert similar[b, j].item() == max(cos, key=cos.get)


def test_merge_conserves_the_weighted_sum():
    sel, pruned = random_split(2, 10, 3, 5)
    x = torch.randn(2, 10, 4, dtype=torch.float64)
    size = torch.rand(2, 10, dtype=torch.float64) + 0.5
    target = torch.randint(0, 3, pruned.shape)
    merged_size = tm.merged_sizes(size, sel, pruned, target)
    out = tm.merge_tokens(x, sel, pruned, target, size, merged_size, 1)
    torch.testing.assert_close((out * merged_size.unsqueeze(-1)).sum(1), (x * size.unsqueeze(-1)).sum(1))


# ------------------------------------------------------------------------------ in a model
@pytest.fixture(scope="module")
def vim():
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, embed_dim=32, depth=6, d_state=4, num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, x, prepare(model, (x[:1],))


def run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("reduction", MERGES)
def test_ratio_zero_is_the_dense_model(vim, reduction):
    model, x, _ = vim
    pruned = compile_pruned(model, ratio=0.0, example_inputs=(x[:1],), reduction=reduction)
    assert torch.equal(run(pruned, x), run(model, x))


@pytest.mark.parametrize("reduction, alignment", list(itertools.product(MERGES, ("hold", "none", "decay"))))
def test_keep_all_equals_dense(vim, reduction, alignment):
    model, x, prepared = vim
    analysis, gm = prepared.analysis, prepared.captured.gm
    sites = [SiteSpec(key, analysis.site_length(key)) for key in (2, 4)]
    settings = PruneSettings(alignment=alignment, reduction=reduction)
    rewritten = run_passes([PruneTokens(analysis, sites, settings)], gm).graph_module
    assert any(getattr(n.target, "__name__", "") == "merge_tokens" for n in rewritten.graph.nodes)
    with torch.no_grad():
        for got, expected in zip(run_graph(rewritten, [x]), run_graph(gm, [x])):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def builds(vim):
    _, _, prepared = vim
    return {(r, a): build(prepared, PruneSettings(schedule={2: 0.5, 4: 0.7}, alignment=a, reduction=r))
            for r in ("drop",) + MERGES for a in ("hold", "decay", "none")}


@pytest.mark.parametrize("reduction, alignment", list(itertools.product(MERGES, ("hold", "decay", "none"))))
def test_merge_composes_with_every_alignment(vim, builds, reduction, alignment):
    _, x, _ = vim
    merged, dropped = builds[(reduction, alignment)], builds[("drop", alignment)]
    got, baseline = run(merged, x), run(dropped, x)
    assert torch.isfinite(got).all() and got.shape == baseline.shape
    assert not torch.allclose(got, baseline)          # the merged content reaches the head
    # the first site selects before anything is merged: the same tokens
    assert torch.equal(merged.kept_positions(x)[2], dropped.kept_positions(x)[2])
    assert f"reduction={reduction}" in str(merged.report)


@pytest.mark.parametrize("reduction", MERGES)
def test_batch_invariance(vim, builds, reduction):
    _, x, _ = vim
    model = builds[(reduction, "hold")]
    whole = run(model, x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(run(model, x[i:i + 1]), whole[i:i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", MERGES)
def test_export_round_trip(vim, builds, reduction, tmp_path):
    _, x, _ = vim
    model = builds[(reduction, "hold")]
    path = tmp_path / "merged.pt2"
    model.export(path)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run(model, x), rtol=1e-5, atol=1e-5)


def test_the_merge_flops_are_counted(vim, builds):
    # merge-similar's cosine similarity is a bmm: counted; merge-nearest adds no MACs
    drop, nearest, similar = (builds[(r, "hold")].report.pruned_flops for r in ("drop",) + MERGES)
    assert nearest == drop
    assert similar > drop


def test_unknown_reduction_is_refused():
    with pytest.raises(InvalidArgumentError, match="reduction must be one of"):
        PruneSettings(reduction="merge")
    assert PruneSettings(reduction="merge-similar").reduction is Reduction.MERGE_SIMILAR


# ------------------------------------------------------------------------------ fill="carry": ToMe's unmerge
@pytest.fixture(scope="module")
def features():
    model = vim_features(depth=8, out_indices=(7,))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, prepare(model, (x[:1],))


@pytest.mark.parametrize("reduction", MERGES)
def test_carry_restores_the_merge_targets_value(features, reduction):
    model, x, prepared = features
    pruned = build(prepared, PruneSettings(schedule={SITE: 0.5}, fill="carry", reduction=reduction))
    out = run(pruned, x)[0]                                   # (B, L, C) after block 7, restored
    kept = pruned.kept_positions(x)[SITE]
    stream = model.stream_after(x, SITE).detach()             # what crosses the site (hidden + residual)
    length = stream.shape[1]
    cls = length // 2                                          # ViM's middle class token: never a target
    for b in range(x.shape[0]):
        kept_b = [p for p in kept[b].tolist() if p != cls]
        for p in sorted(set(range(length)) - set(kept[b].tolist())):
            if reduction == "merge-nearest":
                q = min(kept_b, key=lambda k: (abs(k - p), k))
            else:
                q = max(kept_b, key=lambda k: F.cosine_similarity(stream[b, p], stream[b, k], dim=0).item())
            assert torch.equal(out[b, p], out[b, q]), (b, p, q)
    assert "carry (unmerged)" in str(pruned.report)


# ------------------------------------------------------------------------------ step-size metrics
@pytest.mark.parametrize("metric", ["delta", "delta-max"])
def test_step_size_scores_equal_the_definition(metric):
    """The kept tokens are the top-K of the direct definition: per direction the channel mean of
    softplus(dt_proj(x_proj(conv(x))) + bias), summed ("delta") or their maximum ("delta-max")."""
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    key, keep = 2, 9
    pruned = compile_pruned(model, example_inputs=(x[:1],), schedule={key: keep / 17}, metric=metric)
    kept = pruned.kept_positions(x)[key]
    captured = {}
    scans = []

    def record(name):
        def hook(module, args, kwargs):
            captured[name] = args[0] if args else kwargs["hidden_states"]
        return hook
    mixer = model.layers[key - 1].mixer
    handle = mixer.register_forward_pre_hook(record("x"), with_kwargs=True)
    run(model, x)
    handle.remove()
    for direction in ("", "_b"):
        hidden = captured["x"]
        if direction:
            hidden = hidden.flip(1)
        xz = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias)
        u = xz[..., : xz.shape[-1] // 2].transpose(1, 2)
        conv = getattr(mixer, "conv1d" + direction)
        u = F.silu(causal_conv1d(u, conv))
        x_dbl = getattr(mixer, "x_proj" + direction)(u.transpose(1, 2))
        dt_proj = getattr(mixer, "dt_proj" + direction)
        dt = F.softplus(x_dbl[..., : dt_proj.in_features] @ dt_proj.weight.T + dt_proj.bias)   # (B, L, D)
        score = dt.mean(-1)
        scans.append(score.flip(1) if direction else score)
    scores = scans[0] + scans[1] if metric == "delta" else torch.maximum(scans[0], scans[1])
    cls = scores.shape[1] // 2
    scores[:, cls] = float("inf")
    expected = scores.topk(kept.shape[1], dim=1).indices.sort(dim=1).values
    assert torch.equal(kept, expected)


# ------------------------------------------------------------------------------ a grid: PlainMamba
def test_plainmamba_merges_by_grid_distance_and_keeps_all_exactly():
    from mambaprune.analysis import fact_of
    from mambaprune.rewrite.merge import grid_width, position_coordinates
    from mambaprune.rewrite.context import RewriteContext

    torch.manual_seed(0)
    model = create_model("plainmamba_l1", img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=4,
                         num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prepared = prepare(model, (x[:1],))
    analysis, gm = prepared.analysis, prepared.captured.gm
    stream = analysis.stream_parts(2)
    ctx = RewriteContext(gm, analysis, [2], PruneSettings(reduction="merge-nearest")).at(2)
    assert grid_width(ctx, fact_of(stream[0])) == 4                    # 32 / 8: a 4 x 4 grid of patches
    assert position_coordinates(fact_of(stream[0]), 4)[6].tolist() == [1.0, 2.0]
    for reduction in MERGES:
        sites = [SiteSpec(2, analysis.site_length(2))]
        settings = PruneSettings(reduction=reduction)
        rewritten = run_passes([PruneTokens(analysis, sites, settings)], gm).graph_module
        with torch.no_grad():
            torch.testing.assert_close(run_graph(rewritten, [x])[0], run_graph(gm, [x])[0], rtol=1e-5, atol=1e-5)
        pruned = build(prepared, PruneSettings(schedule={2: 0.5}, reduction=reduction))
        assert torch.isfinite(run(pruned, x)).all()


def test_inductor_compiles_a_merge():
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, embed_dim=32, depth=3, d_state=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    eager = compile_pruned(model, ratio=0.2, example_inputs=(x[:1],), reduction="merge-similar")
    compiled = compile_pruned(model, ratio=0.2, example_inputs=(x[:1],), reduction="merge-similar", backend="inductor")
    torch.testing.assert_close(run(compiled, x), run(eager, x), rtol=1e-4, atol=1e-4)
