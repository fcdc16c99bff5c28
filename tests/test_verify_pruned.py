"""The pruned-run check (rewrite/verify_pruned.py) and the masked formulation of hold it compares with
(rewrite/masked_hold.py): what they compute, what they compare and what they say they did not."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))

import architectures as arch  # noqa: E402
from mamba_ssm_stub import installed  # noqa: E402

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.analysis import Layout, Tok  # noqa: E402
from mambaprune.api.compile import build, prepare  # noqa: E402
from mambaprune.errors import UnsupportedModelError  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.rewrite import SiteSpec, verify_pruned_run  # noqa: E402
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


class CausalAttention(arch.Attention):
    """timm's Attention, causal."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_what_cannot_be_compared_is_said():
    """Causal attention over the kept tokens has no masked formulation (yet): the output is not compared, and
    the report says why."""
    torch.manual_seed(0)
    model = arch.MambaVisionStyle().eval()
    for block in model.blocks:
        if isinstance(block.mixer, arch.Attention):
            block.mixer.__class__ = CausalAttention
    _, _, check = check_of(model, images(model.img_size), ratio=0.2)
    assert "attention over the tokens with a mask, causal" in check.outputs[0].skipped, check.describe()
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
    monkeypatch.setattr(MaskedHold, "_attention", lambda self, n, keep, args, kwargs: (n.target(*args, **kwargs), None))
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
