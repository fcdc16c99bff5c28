"""The pruned-run check (rewrite/verify_pruned.py) and the masked formulation of hold it compares with
(rewrite/masked_hold.py): what they compute, what they compare and what they say they did not."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import architectures as arch  # noqa: E402
from mamba_ssm_stub import installed  # noqa: E402

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.analysis import Layout, Tok  # noqa: E402
from mambaprune.api.compile import build, prepare  # noqa: E402
from mambaprune.errors import UnsupportedModelError  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.rewrite import SiteSpec, verify_pruned_run  # noqa: E402
from mambaprune.analysis import fact_of  # noqa: E402
from mambaprune.meta_keys import TOKENS  # noqa: E402
from mambaprune.rewrite import masked_attention, masked_hold  # noqa: E402
from mambaprune.rewrite.masked_attention import attention_mask  # noqa: E402
from mambaprune.rewrite.masked_hold import MaskedHold, mask_like, path_gaps_dense  # noqa: E402
from mambaprune.rewrite.verify_pruned import check_kept_positions  # noqa: E402
from mambaprune.runtime import selective_scan  # noqa: E402
from mambaprune.settings import Alignment, Fill, PruneSettings  # noqa: E402


def images(size, batch=1, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Features(nn.Module):
    """Issue 25's model: a tiny ViM returning the token features (h + residual) after blocks 2 and 11."""

    def __init__(self, blocks=(2, 11)):
        super().__init__()
        torch.manual_seed(0)
        self.v = create_model("vim_t", img_size=64, depth=12, embed_dim=64, num_classes=10)
        self.blocks = blocks

    def forward(self, x):
        v = self.v
        h = v.patch_embed(x)
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half], v.cls_token.expand(h.shape[0], -1, -1), h[:, half:]], 1) + v.pos_embed
        res, feats = None, []
        for i, layer in enumerate(v.layers):
            h, res = layer(h, res)
            if i in self.blocks:
                feats.append(h + res)
        return feats


class AuxiliaryHead(nn.Module):
    """Deep supervision: a tiny ViM whose classifier also reads the mixer output of block `at` (max over the
    tokens), the block a site follows."""

    def __init__(self, at=3):
        super().__init__()
        torch.manual_seed(0)
        self.v = create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10)
        self.at = at

    def forward(self, x):
        v = self.v
        h = v.patch_embed(x) + v.pos_embed[:, 1:]
        res, aux = None, None
        for i, layer in enumerate(v.layers):
            h, res = layer(h, res)
            if i == self.at:
                aux = v.head(h.amax(1))
        return v.head((h + res).mean(1)), aux


def check_of(model, x, **settings):
    """(prepared, settings, the PrunedRunCheck of a build without verify)."""
    prep = prepare(model.eval(), (x,))
    settings = PruneSettings(**{"ratio": 0.3, **settings})
    pruned = build(prep, settings.with_(verify=False))
    sites = [SiteSpec(k, keep) for k, keep in pruned.report.sites.items()]
    return prep, settings, verify_pruned_run(prep.captured.gm, pruned.graph_module, prep.analysis, sites,
                                             prep.flat, settings)


# ---------------------------------------------------------------------- early feature maps stay dense
def test_feature_map_before_the_site_is_dense():
    model, x = Features().eval(), images(64, batch=2)
    pruned = compile_pruned(model, 0.2, (x[:1],), schedule={6: 0.5})
    with torch.no_grad():
        early, late = pruned(x)
        dense_early, dense_late = model(x)
    assert (early - dense_early).abs().max() <= 1e-6 * (1 + dense_early.abs().max())
    assert not torch.allclose(late, dense_late, atol=1e-3)   # the site does feed the late one


def test_a_wrong_early_feature_map_is_refused():
    """Whatever the rewrite does with the feature map before the site, verify passes only when it is dense."""
    model, x = Features().eval(), images(64)
    pruned = compile_pruned(model, 0.2, (x,), schedule={6: 0.5}, verify=False)
    with torch.no_grad():
        early = pruned(x)[0]
        dense_early = model(x)[0]
    wrong = (early - dense_early).abs().max() > 1e-6 * (1 + dense_early.abs().max())
    if wrong:
        with pytest.raises(UnsupportedModelError, match=r"output 0 .*no pruning site feeds it"):
            compile_pruned(model, 0.2, (x,), schedule={6: 0.5})
    else:
        prep, settings, check = check_of(model, x, ratio=0.2, schedule={6: 0.5})
        assert [o.compared_with for o in check.outputs] == ["dense", "masked"]


# ------------------------------------------------------------------------------ what is compared
def test_isotropic_and_hierarchical_models_are_compared_with_the_masked_run():
    for model, size in ((create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10), 64),
                        (arch.VMambaStyle(depths=(2, 3)), 32), (arch.HierarchicalVim(depths=(3, 3)), 32)):
        for alignment, fill in (("hold", "carry"), ("decay", "zeros"), ("hold", "zeros")):
            if isinstance(model, arch.VMambaStyle) and alignment == "decay":
                continue   # refused by the rewrite: one gap for directions folded into one scan
            _, _, check = check_of(model, images(size), alignment=alignment, fill=fill)
            assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
            assert check.outputs[0].difference <= check.outputs[0].tolerance


@pytest.mark.parametrize("name, settings", [
    ("mambavision_explicit_attn", dict(ratio=0.2)),      # attention after the mixers runs on restored tokens
    ("vmamba_merge", dict(reduction="merge-nearest", schedule={1: 0.6})),   # ToMe's unmerge before the downsampling
    ("vmamba_merge", dict(reduction="merge-similar", schedule={1: 0.6})),
])
def test_restores_under_carry_are_compared_and_a_wrong_fill_is_refused(name, settings):
    """fill='carry' where the rewrite restores tokens (a decoder's inputs, falling back to nearest where carry is
    not defined; a stage under a merge: the value of the kept token each pruned one ended in) has a masked
    formulation: compared at every position, and the check refuses the build when it assumes another fill."""
    model = arch.VMambaStyle(depths=(2, 3)) if name == "vmamba_merge" else arch.build(name)
    x = images(getattr(model, "img_size", 32))
    prep, config, check = check_of(model, x, fill="carry", **settings)
    assert [o.compared_with for o in check.outputs] == ["masked"] and check.outputs[0].where == "all positions", \
        check.describe()
    assert check.outputs[0].difference <= check.outputs[0].tolerance
    pruned = build(prep, config.with_(verify=False))
    sites = [SiteSpec(k, keep) for k, keep in pruned.report.sites.items()]
    wrong = "zeros" if settings.get("reduction") == "merge-nearest" else "nearest"   # unmerge of merge-nearest ~ nearest
    with pytest.raises(UnsupportedModelError, match="pruned this model wrongly"):
        verify_pruned_run(prep.captured.gm, pruned.graph_module, prep.analysis, sites, prep.flat,
                          config.with_(fill=wrong))


@pytest.mark.parametrize("alignment", ["hold", "none"])
def test_an_auxiliary_head_at_a_site_is_the_dense_value(alignment):
    """A head reading the output of the block a site follows is computed before the site, densely, by the
    pruned graph: it is compared with the model (not masked: that would refuse a right build)."""
    _, _, check = check_of(AuxiliaryHead(), images(64, batch=2), schedule={4: 0.5}, alignment=alignment)
    assert [o.compared_with for o in check.outputs] == ["masked", "dense"], check.describe()


class AttentionOf(arch.Attention):
    """timm's Attention whose sdpa call is `attend(q, k, v)` (set by a subclass)."""

    @staticmethod
    def attend(q, k, v):
        raise NotImplementedError

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, C))


class CausalAttention(AttentionOf):
    attend = staticmethod(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))


class OwnMaskAttention(AttentionOf):
    """Given its own (causal) boolean mask: not attention over the kept tokens, so the tokens are restored
    before it and it runs densely, and so does the attention block after it."""
    attend = staticmethod(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()))


class ReorderedValuesAttention(AttentionOf):
    """Values read in reverse token order: the j-th kept key goes with the j-th kept value of another order,
    which no mask of the dense attention states."""
    attend = staticmethod(lambda q, k, v: F.scaled_dot_product_attention(q, k, v.flip(-2)))


def mambavision_with(attention):
    """The hybrid MambaVision-style model with its attention blocks' class replaced by `attention`."""
    torch.manual_seed(0)
    model = arch.MambaVisionStyle().eval()
    for block in model.blocks:
        if isinstance(block.mixer, arch.Attention):
            block.mixer.__class__ = attention
    return model


@pytest.mark.parametrize("alignment", ["hold", "none", "none-unsorted"])
def test_causal_attention_over_the_kept_tokens_is_compared(monkeypatch, alignment):
    """The j-th kept query attends to the first j + 1 kept keys: compared with the masked run. The same check
    with the causal part of the mask forgotten (every kept key) refuses the build, so the comparison has power."""
    model, x = mambavision_with(CausalAttention), images(32, batch=2)
    _, _, check = check_of(model, x, ratio=0.2, alignment=alignment)
    assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
    assert check.outputs[0].difference <= check.outputs[0].tolerance
    keys_only = lambda n, keep, args, kwargs: (      # noqa: E731
        mask_like(fact_of(n.args[1]), tuple(args[1].shape), keep).transpose(-1, -2), None)
    monkeypatch.setattr(masked_attention, "attention_mask", keys_only)
    with pytest.raises(UnsupportedModelError, match="pruned this model wrongly"):
        check_of(model, x, ratio=0.2, alignment=alignment)


def test_causal_attention_mask_is_the_definition():
    """attention_mask against a direct statement: query slot p (kept or not) may read key slot s when s is kept
    and there are no more kept slots up to s than up to p; a row with no such key reads every kept key."""
    graph = fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    layout = Layout.identity(6)
    for node in (q, k, v):
        node.meta[TOKENS] = Tok(2, layout)
    n = graph.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, k, v), {"is_causal": True})
    keep = torch.tensor([[False, True, False, True, True, False], [True, False, False, False, False, True]])
    values = (torch.zeros(2, 1, 6, 4),) * 3
    mask, reason = attention_mask(n, keep, values, {})
    assert reason is None and mask.shape == (2, 1, 6, 6)
    for b in range(2):
        kept = keep[b].tolist()
        for p in range(6):
            row = [kept[s] and sum(kept[:s + 1]) <= sum(kept[:p + 1]) for s in range(6)]
            row = row if any(row) else kept
            assert mask[b, 0, p].tolist() == row, (b, p)


class Pooled(nn.Module):
    """A ViM-style stack read out by a max over the tokens, `pool="grid"`: by a global adaptive max pool of the
    grid, `pool="mean"`: by a mean accumulated in float64; `positions=True` returns where the maximum is too."""

    def __init__(self, pool="max", positions=False):
        super().__init__()
        torch.manual_seed(0)
        self.v = create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10)
        self.pool, self.positions = pool, positions

    def forward(self, x):
        v = self.v
        h = v.patch_embed(x) + v.pos_embed[:, 1:]
        res = None
        for layer in v.layers:
            h, res = layer(h, res)
        h = h + res
        if self.pool == "mean":
            return v.head(h.mean(1, dtype=torch.float64).float())
        if self.pool == "grid":
            side = int(h.shape[1] ** 0.5)
            grid = h.transpose(1, 2).reshape(h.shape[0], -1, side, side)
            return v.head(F.adaptive_max_pool2d(grid, 1).flatten(1))
        values, where = h.max(dim=1)
        return (v.head(values), where) if self.positions else v.head(values)


@pytest.mark.parametrize("pool", ["max", "grid", "mean"])
def test_a_pooling_of_the_tokens_is_compared(monkeypatch, pool):
    """A max pooling (and a mean in another dtype) reads the kept tokens only: compared with the masked run,
    and refused when the masked run's pooling reads every token."""
    model, x = Pooled(pool), images(64, batch=2)
    _, _, check = check_of(model, x, ratio=0.3)
    assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
    monkeypatch.setattr(masked_hold, "masked_pool", lambda n, keep, args, kwargs: (n.target(*args, **kwargs), None))
    with pytest.raises(UnsupportedModelError, match="pruned this model wrongly"):
        check_of(model, x, ratio=0.3)


def test_reading_where_a_max_is_restores_the_tokens_before_it():
    """A max over the kept tokens would say where the maximum is among the kept tokens: the analysis does not
    read it as a readout, the tokens are restored before it, and both results are compared."""
    model, x = Pooled(positions=True), images(64, batch=2)
    _, _, check = check_of(model, x, ratio=0.2)
    assert [o.compared_with for o in check.outputs] == ["masked", "masked"], check.describe()
    pruned = compile_pruned(model, 0.2, (x[:1],))
    assert [r.fill for r in pruned.report.restorations] == ["carry"]
    with torch.no_grad():
        where = pruned(x)[1]
    assert where.min() >= 0 and where.max() < 16      # original positions, not positions among the kept tokens


def test_what_runs_densely_on_restored_tokens_is_compared():
    """The blocks after a restore run on the restored maps as the model runs them, not masked again: the
    output is compared, and the check refuses the build whose restore used another fill than it says."""
    model = mambavision_with(OwnMaskAttention)
    x = images(model.img_size, batch=2)
    prep, config, check = check_of(model, x, schedule={1: 0.5}, fill="nearest")
    assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
    pruned = build(prep, config.with_(verify=False, fill="zeros"))
    assert {r.fill for r in pruned.report.restorations} == {"zeros"}
    sites = [SiteSpec(k, keep) for k, keep in pruned.report.sites.items()]
    with pytest.raises(UnsupportedModelError, match="pruned this model wrongly"):
        verify_pruned_run(prep.captured.gm, pruned.graph_module, prep.analysis, sites, prep.flat, config)


def test_what_cannot_be_compared_is_said():
    """What the masked formulation does not define is not compared, and the report says why."""
    model = mambavision_with(ReorderedValuesAttention)
    _, _, check = check_of(model, images(model.img_size), ratio=0.2)
    assert "attention whose keys and values are in different orders" in check.outputs[0].skipped, check.describe()
    assert check.unchecked == [check.outputs[0]] and "not compared" in check.describe()


@pytest.mark.parametrize("alignment", ["none", "none-unsorted"])
def test_a_class_token_cut_out_of_the_tokens_is_compared_under_none(alignment):
    """The stream around a class token sliced out before every mixer runs in original coordinates (as the
    pruned graph runs it, kept tokens at their own positions); each mixer reads it in its site's compacted
    coordinates. The check refuses the same build checked as `hold`, so the comparison has power."""
    model = arch.build("cls_sliced_middle")
    prep, config, check = check_of(model, images(model.img_size), alignment=alignment)
    assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
    assert check.outputs[0].difference <= check.outputs[0].tolerance
    pruned = build(prep, config.with_(verify=False))
    sites = [SiteSpec(k, keep) for k, keep in pruned.report.sites.items()]
    with pytest.raises(UnsupportedModelError, match="pruned this model wrongly"):
        verify_pruned_run(prep.captured.gm, pruned.graph_module, prep.analysis, sites, prep.flat,
                          config.with_(alignment="hold"))


@pytest.mark.parametrize("alignment", ["hold", "none"])
def test_attention_over_the_tokens_is_compared_with_the_pruned_keys_masked(monkeypatch, alignment):
    """MambaVision's sdpa blocks after a site: the masked run lets every query attend to the kept keys only.
    Without that mask the formulation is another model, and the check says so."""
    model = arch.build("mambavision")
    x = images(model.img_size, batch=2)
    _, _, check = check_of(model, x, alignment=alignment)
    assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
    monkeypatch.setattr(masked_hold, "masked_attention", lambda n, keep, args, kwargs: (n.target(*args, **kwargs), None))
    with pytest.raises(UnsupportedModelError, match="pruned this model wrongly"):
        check_of(model, x, alignment=alignment)


def test_official_plainmamba_zipped_scans_are_compared():
    """u in zig-zag order, dt / B / C in raster order: the masked run pairs the j-th kept token of each."""
    with installed():
        import official_plainmamba
        torch.manual_seed(0)
        model = official_plainmamba.tiny_classifier()
        for alignment in ("hold", "decay"):
            _, _, check = check_of(model, images(32), ratio=0.2, alignment=alignment)
            assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()


# -------------------------------------------------------------------------- the masked formulation
def test_masked_run_with_every_token_kept_is_the_dense_graph():
    model = arch.HierarchicalVim(depths=(3, 3)).eval()
    prep = prepare(model, (images(32),))
    keep = {k: torch.ones(1, prep.analysis.site_length(k), dtype=torch.bool) for k in (1, 2, 4)}
    for alignment in (Alignment.HOLD, Alignment.DECAY):
        masked = MaskedHold(prep.analysis, keep, alignment, Fill.ZEROS).run(*prep.flat)
        torch.testing.assert_close(masked, model(images(32)), rtol=1e-5, atol=1e-6)


def test_a_masked_scan_is_the_scan_of_the_kept_tokens():
    """delta = 0 at pruned steps (hold) / the gap to the previous kept step (decay): the scan's outputs at
    the kept steps are the scan run on the kept steps only, hand-checked through the op's definition."""
    torch.manual_seed(0)
    b, d, n, length = 1, 3, 2, 9
    u, delta = torch.randn(b, d, length), torch.rand(b, d, length)
    A, B, C = -torch.rand(d, n) - 0.5, torch.randn(b, n, length), torch.randn(b, n, length)
    kept = torch.tensor([0, 2, 3, 7])
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, kept] = True
    masked = selective_scan(u, delta * mask, A, B, C)[..., kept]
    compact = selective_scan(u[..., kept], delta[..., kept], A, B[..., kept], C[..., kept])
    torch.testing.assert_close(masked, compact)
    gap = path_gaps_dense(mask)
    assert gap[0, kept].tolist() == [1.0, 2.0, 1.0, 4.0]
    decayed = selective_scan(u, delta * mask, A, B, C, gap=gap)[..., kept]
    compact = selective_scan(u[..., kept], delta[..., kept], A, B[..., kept], C[..., kept],
                             gap=torch.tensor([[1.0, 2.0, 1.0, 4.0]]))
    torch.testing.assert_close(decayed, compact)


def test_masks_follow_the_operands_layout():
    keep = torch.tensor([[True, False, True, True]])
    flipped = Tok(2, Layout([3, 2, 1, 0]))
    assert mask_like(flipped, (1, 5, 4), keep).reshape(-1).tolist() == [True, True, False, True]
    assert mask_like(Tok(1, Layout.identity(4)), (1, 4, 5), keep).shape == (1, 4, 1)
    assert mask_like(Tok(2, Layout.identity(3)), (1, 5, 3), keep) is None     # another stage's tokens


def test_invalid_kept_positions_are_refused():
    prep = prepare(create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10).eval(), (images(64),))
    protected = sorted(prep.analysis.protected)
    assert protected == [8]
    sites = [SiteSpec(2, 4), SiteSpec(4, 3)]
    good = {2: torch.tensor([[1, 5, 8, 9]]), 4: torch.tensor([[5, 8, 9]])}
    check_kept_positions(good, sites, prep.analysis, Alignment.HOLD)
    for bad, why in (({2: torch.tensor([[5, 1, 8, 9]])}, "not strictly increasing"),
                     ({2: torch.tensor([[1, 5, 7, 9]])}, "protected position"),
                     ({2: torch.tensor([[1, 5, 8, 17]])}, "outside"),
                     ({4: torch.tensor([[2, 8, 9]])}, "an earlier site of its stage pruned"),
                     ({4: torch.tensor([[5, 8]])}, "keeps 2 tokens, the plan 3")):
        with pytest.raises(UnsupportedModelError, match=why):
            check_kept_positions({**good, **bad}, sites, prep.analysis, Alignment.HOLD)
    check_kept_positions({**good, 2: torch.tensor([[5, 1, 8, 9]])}, sites, prep.analysis, Alignment.NONE_UNSORTED)
