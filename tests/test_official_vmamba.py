"""compile_pruned on VMamba as its authors wrote it (tests/official_vmamba: our reproduction of
MzeroMiko/VMamba's vmamba.py / csms6s.py / csm_triton.py, official names and code paths).

Nothing is registered by hand: `csms6s.selective_scan_fn` and the csm_triton cross-scan / merge
(whose torch path runs under `torch.cuda.device`, so the dense model cannot run on a CPU) are routed
automatically. The tiny config has 16 channels on a 16 x 16 grid, and its patch embedding's first
conv makes (B, 8, 32, 32): both widths coincide with the token count or the grid side, and neither
may be read as the token axis.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from mambaprune.api.compile import build, prepare
from mambaprune.settings import PruneSettings
from tests.official_vmamba import csm_triton
from tests.official_vmamba import vmamba as official

RATIO = 0.3
TOL = 1e-5
DEPTHS = [2, 2, 4, 2]


@contextlib.contextmanager
def cuda_device_is_a_no_op():
    """Only to compute the dense reference on a CPU: the official wrapper raises for a CPU tensor."""
    wrapper = torch.cuda.device
    torch.cuda.device = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.device = wrapper


def dense(model, x):
    with cuda_device_is_a_no_op(), torch.no_grad():
        return model(x)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def v05():
    torch.manual_seed(0)
    model = official.vmamba_tiny_s1l8(dims=16, depths=DEPTHS, num_classes=10).eval()
    before = state(model)
    prepared = prepare(model, (torch.randn(2, 3, 64, 64),))
    return model, before, prepared


@pytest.fixture(scope="module")
def v05_pruned(v05):
    model, _, prepared = v05
    return build(prepared, PruneSettings(ratio=RATIO))


def test_the_official_model_cannot_run_on_a_cpu_by_itself(images):
    model = official.vmamba_tiny_s1l8(dims=16, depths=[1, 1, 1, 1], num_classes=10).eval()
    with pytest.raises(ValueError, match="cuda"):
        model(images)


def test_v05_noz_ratio_0_is_the_dense_model_on_a_cpu(v05, images):
    model, _, prepared = v05
    fast = build(prepared, PruneSettings(ratio=0.0))
    assert (fast(images) - dense(model, images)).abs().max().item() <= TOL
    routed = " ".join(fast.report.routed_scans)
    for entry in ("csms6s.selective_scan_fn", "csm_triton.cross_scan_fn", "csm_triton.cross_merge_fn"):
        assert entry in routed


def test_v05_noz_blocks_are_understood_despite_widths_equal_to_the_grid(v05):
    _, _, prepared = v05
    analysis = prepared.analysis
    assert [b.name for b in analysis.blocks] == [f"layers.{s}.blocks.{b}.op" for s, d in enumerate(DEPTHS)
                                                 for b in range(d)]
    assert all("4 directions in one call" in b.mixing for b in analysis.blocks)
    reasons = " ".join(r for r in analysis.invalid_sites.values())
    assert "layer_norm" not in reasons and "linear layer mixes" not in reasons
    # every site but those after the last block of a stage (and in the 1-token last stage) is possible
    assert sorted(analysis.sites) == [1, 3, 5, 6, 7, 9]


def test_v05_noz_pruned_at_0_3_in_the_first_three_stages(v05_pruned, images):
    report = v05_pruned.report
    assert abs(report.achieved_ratio - RATIO) <= 0.03
    stages = {report.site_lengths[k] for k in report.sites}
    assert stages == {256, 64, 16}
    out = v05_pruned(images)
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_v05_noz_pruned_is_batch_invariant(v05_pruned, images):
    whole = v05_pruned(images)
    one_by_one = torch.cat([v05_pruned(images[i:i + 1]) for i in range(len(images))])
    assert (whole - one_by_one).abs().max().item() <= TOL


def test_the_users_model_is_untouched(v05, v05_pruned, images):
    model, before, _ = v05
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert official.cross_scan_fn is csm_triton.cross_scan_fn      # the routes were undone
    assert csm_triton.CrossScanF.__name__ == "CrossScanF" and hasattr(csm_triton.CrossScanF, "forward")
    with pytest.raises(ValueError, match="cuda"):                   # still the official code
        model(images)


def test_v0_patch_merging_reads_the_restored_grid_through_each_of_its_strided_slices(images):
    """v0's PatchMerging2D reads the stage's grid through 8 strided slices; every one of them reads the
    restored grid, so sites inside the first three stages are possible: ratio 0 exact, 0.3 reached, every
    token kept at the pruned sites reproduces the model, batch invariant."""
    torch.manual_seed(0)
    model = official.vanilla_vmamba_tiny(dims=16, depths=DEPTHS, num_classes=10).eval()
    prepared = prepare(model, (torch.randn(2, 3, 64, 64),))
    fast = build(prepared, PruneSettings(ratio=0.0))
    assert (fast(images) - dense(model, images)).abs().max().item() <= TOL
    assert all("4 directions in one call" in b.mixing for b in prepared.analysis.blocks)   # cat + flip, einsum
    assert sorted(prepared.analysis.sites) == [1, 3, 5, 6, 7, 9]
    assert all(len(prepared.analysis.stage_end(k).readers) == 6 for k in (1, 3, 5))   # the slices beside the first
    pruned = build(prepared, PruneSettings(ratio=RATIO))
    assert abs(pruned.report.achieved_ratio - RATIO) <= 0.03 and min(pruned.report.sites) == 1
    keep_all = build(prepared, PruneSettings(ratio=RATIO, schedule={k: 1.0 for k in pruned.report.sites}))
    with torch.no_grad():
        assert (keep_all(images) - dense(model, images)).abs().max().item() <= TOL
        whole = pruned(images)
        one_by_one = torch.cat([pruned(images[i:i + 1]) for i in range(len(images))])
    assert (whole - one_by_one).abs().max().item() <= TOL


def hand_cross_scan(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
    """csm_triton's torch path called from a function of the user's own: nothing routes it."""
    return csm_triton.cross_scan_fwd(x, in_channel_first, out_channel_first, scans)


def hand_cross_merge(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
    return csm_triton.cross_merge_fwd(y, in_channel_first, out_channel_first, scans)


def test_an_unrouted_cross_scan_filling_new_empty_by_slices_prunes_as_the_routed_one(monkeypatch, v05_pruned, images):
    """csm_triton's torch cross-scan called from the user's own function (nothing routes it): its new_empty
    filled by slice writes is read as the cat it computes (capture/slice_fills.py), and the pruned model is
    the one built from the routed official code."""
    monkeypatch.setattr(official, "cross_scan_fn", hand_cross_scan)
    monkeypatch.setattr(official, "cross_merge_fn", hand_cross_merge)
    torch.manual_seed(0)
    model = official.vmamba_tiny_s1l8(dims=16, depths=DEPTHS, num_classes=10).eval()
    prepared = prepare(model, (torch.randn(2, 3, 64, 64),))
    assert prepared.analysis.not_understood == []
    assert not any("cross_scan" in r for r in build(prepared, PruneSettings(ratio=0.0)).report.routed_scans)
    assert (build(prepared, PruneSettings(ratio=0.0))(images) - dense(model, images)).abs().max().item() <= TOL
    fast = build(prepared, PruneSettings(ratio=RATIO))
    assert fast.report.sites == v05_pruned.report.sites
    assert (fast(images) - v05_pruned(images)).abs().max().item() <= TOL
