"""compile_pruned on the real `mambavision` package (NVlabs, from the registry, installed --no-deps).

Its timm and mamba_ssm imports are stubbed (tests/mambavision_stubs.py: only what needs CUDA or timm);
the model code is the package's own. `window_reverse` computes the batch with int(...), which would fix
it under torch.export; capture routes that int (capture/batch_int.py), so the model is captured with
a dynamic batch and the pruned model runs every batch. Pruned at 0.3 in
stages 3 and 4: the windows there cover the whole grid (partition and reverse are reshapes), the
attention blocks after the mixers run on the kept tokens, and each stage's grid is whole again
before window_reverse and the downsampling.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mambavision_stubs  # noqa: E402

mambavision_stubs.install()
mamba_vision = pytest.importorskip("mambavision.models.mamba_vision")

from mambaprune.api.compile import build, prepare  # noqa: E402
from mambaprune.settings import PruneSettings  # noqa: E402

BATCH = 3
RATIO = 0.3


@pytest.fixture(scope="module")
def tiny():
    """MambaVision-T's code with a tiny config: 128 x 128 images, stages 3-4 on 8 x 8 and 4 x 4 grids whose
    windows (8, 4) cover the whole grid, as MambaVision-T's (14, 7) do at 224; two mixers then two
    attention blocks in each of stages 3 and 4."""
    torch.manual_seed(0)
    model = mamba_vision.MambaVision(dim=16, in_dim=8, depths=[1, 1, 4, 4], window_size=[8, 8, 8, 4], mlp_ratio=2,
                                     num_heads=[2, 2, 2, 4], num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(BATCH, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    return model, before, images, prepare(model, (images,))


@pytest.fixture(scope="module")
def pruned(tiny):
    return build(tiny[3], PruneSettings(ratio=RATIO, schedule="uniform"))


def test_captured_with_a_dynamic_batch_and_ratio_0_is_the_dense_model_at_every_batch(tiny):
    model, before, images, prepared = tiny
    assert prepared.captured.static_batch is None
    fast = build(prepared, PruneSettings(ratio=0.0))
    with torch.no_grad():
        for batch in (1, 2, 3):
            assert (fast(images[:batch]) - model(images[:batch])).abs().max().item() <= 1e-5
    assert "captured with the batch fixed" not in str(fast.report)
    assert any("mamba_ssm.ops.selective_scan_interface.selective_scan_fn" in r for r in fast.report.routed_scans)
    assert [b.name for b in prepared.analysis.blocks] == [f"levels.{s}.blocks.{i}.mixer" for s in (2, 3) for i in (0, 1)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruned_runs_every_batch_each_sample_on_its_own(tiny, pruned):
    """Batches 1, 2, 3: each sample's output is the one it gets alone (the pruning is per sample); the
    ratio-0 test above checks the graph against the dense model at the same batches."""
    images = tiny[2]
    with torch.no_grad():
        alone = torch.cat([pruned(images[i:i + 1]) for i in range(BATCH)])
        for batch in (1, 2, 3):
            out = pruned(images[:batch])
            assert out.shape == (batch, 10)
            assert (out - alone[:batch]).abs().max().item() <= 1e-5


def test_sites_after_every_mixer_even_the_last_of_a_stage(tiny):
    """The attention blocks after a stage's last mixer run on fewer tokens: a site there is worth it
    (after the model's last mixer too)."""
    analysis = tiny[3].analysis
    assert analysis.valid_sites == [1, 2, 3, 4] and not analysis.invalid_sites
    assert analysis.sites[2].stage_end is not None and analysis.sites[4].stage_end is None


def test_pruned_at_0_3_in_stages_3_and_4(tiny, pruned):
    model, before, images, _ = tiny
    report = pruned.report
    assert abs(report.achieved_ratio - RATIO) <= 0.03, report
    assert {report.site_lengths[k] for k in report.sites} == {64, 16}     # both stages' grids
    assert [b.tokens for b in report.blocks][2] == 16                     # stage 4 starts whole
    with torch.no_grad():
        out = pruned(images)
    assert out.shape == model(images).shape and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruned_is_batch_invariant(tiny, pruned):
    """Each image's output depends on that image only: the batch reordered, the outputs reorder."""
    images = tiny[2]
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert (pruned(images)[order] - pruned(images[order])).abs().max().item() <= 1e-5


def test_mambavision_t_at_224_default_schedule_reaches_the_ratio():
    """The released MambaVision-T config (random weights): ToP's sites snapped to the mixers of stage 3."""
    torch.manual_seed(0)
    model = mamba_vision.mamba_vision_T().eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    prepared = prepare(model, (images,))
    assert prepared.analysis.valid_sites == [1, 2, 3, 4, 5, 6]
    fast = build(prepared, PruneSettings(ratio=RATIO))
    assert abs(fast.report.achieved_ratio - RATIO) <= 0.03, fast.report
    assert [b.tokens for b in fast.report.blocks][4:] == [49, 49]   # the restored stage 4 grid
    with torch.no_grad():
        assert fast(images).shape == (2, 1000)
