"""A stage that ends in an nn.Unfold downsampling inside its last block (Mamba-ND's mmpretrain PatchMerging,
tests/official_zoo/mamba_nd.py), whose blocks move their tokens for the scan and back.

- `aten::im2col` whose 2x2 blocks tile the grid is the stage's downsampling (a barrier);
- the block that holds it is no site: its scan's output scores the tokens of the stage before it;
- the stage is restored where the last block has put its tokens back in the stream's order (after its
  column-major rearrange), so fill='carry' finds the stream there;
- every fill builds, is verified with its output compared against the masked dense run, and keeps the
  standard properties: keep-all equals the model, batch invariance, the user's model untouched.
"""
from __future__ import annotations

import functools

import pytest
import torch

from mambaprune.analysis import fact_of
from mambaprune.analysis.ops import op_name
from mambaprune.api.compile import build, prepare
from mambaprune.settings import PruneSettings
from tests import official_zoo
from tests.official_zoo import checks

TOL = 1e-5


@functools.lru_cache(maxsize=None)
def setup():
    with official_zoo.installed():
        torch.manual_seed(0)
        model = official_zoo.family("mamba_nd").tiny().eval()
        x = checks.images(3, model.img_size)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            dense = model(x)
        return model, x, dense, state, prepare(model, (x[:1],))


def test_the_unfold_is_the_stage_end_and_the_block_holding_it_is_no_site():
    _, _, _, _, prepared = setup()
    analysis = prepared.analysis
    (down,) = analysis.barriers
    assert op_name(down) == "aten::im2col"
    assert analysis.valid_sites == [1, 2, 3, 5]
    assert "ends with the downsampling backbone.layers.3.down_sample_layer" in analysis.invalid_sites[4]
    assert "scores the tokens of the stage before it" in analysis.invalid_sites[4]
    for key in (1, 2, 3):
        assert analysis.stage_end(key).downsampling is down
    assert analysis.stage_end(5) is None


def test_the_stage_is_restored_in_the_order_the_stream_crosses_its_sites():
    """Block 3 reads its tokens column-major and flipped; the restore is after it has put them back."""
    _, _, _, _, prepared = setup()
    analysis = prepared.analysis
    end = analysis.stage_end(3)
    stream = {fact_of(n) for n in analysis.crossing_tokens(3)}
    assert fact_of(end.restore) in stream
    assert op_name(end.restore) != "aten::flip"
    assert [op_name(n) for n in end.chain][-2:] == ["aten::view", "aten::permute"]


@pytest.mark.parametrize("fill", ["carry", "nearest", "zeros"])
def test_every_fill_is_pruned_verified_and_keeps_the_standard_properties(fill):
    model, x, dense, state, prepared = setup()
    schedule = {1: 0.75, 3: 0.6, 5: 0.5}        # two sites in stage 1, one in stage 2
    pruned = build(prepared, PruneSettings(schedule=schedule, fill=fill))
    report = pruned.report
    assert set(report.sites) == set(schedule)
    assert report.site_lengths == {1: 64, 3: 64, 5: 16}
    assert "outputs compared: 1 with the masked dense run" in str(report)
    keep_all = build(prepared, PruneSettings(schedule={k: 1.0 for k in schedule}, fill=fill, verify=False))
    with torch.no_grad():
        assert (keep_all(x) - dense).abs().max() <= TOL
        y = pruned(x)
        assert max((pruned(x[i:i + 1])[0] - y[i]).abs().max() for i in range(len(x))) <= TOL
        assert torch.isfinite(y).all() and (y - dense).abs().max() > 1e-3
        assert torch.equal(model(x), dense)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
