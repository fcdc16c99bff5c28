"""VMamba's cross-scan: 4 directions folded into ONE selective-scan call with grouped B/C.

The compiler prunes inside every stage; before a downsampling the stage's grid is restored (its
pruned cells carry the stream's value at their site, or zeros). The pruned model is checked against
a hand-written reference that runs the blocks after a site on the kept tokens only:
LayerNorm2d / 1x1 convs per token, the depthwise conv2d on a zero grid holding the kept cells, and
each of the 4 directions scanning the SAME kept tokens in its own order (row-major, column-major,
both reversed) with a token-by-token scan, merged back at the kept positions. Malformed relatives
(directions the analyser cannot prove) are refused, never pruned wrong.
"""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import architectures as arch  # noqa: E402

import mambaprune  # noqa: E402
from mambaprune import UnsupportedModelError, selective_scan  # noqa: E402
from mambaprune.analysis import Layout, MultiTok, Tok, Unknown, analyse, fact_of  # noqa: E402
from mambaprune.capture import capture  # noqa: E402

SITE = 3          # after stages.1.blocks.0: the last stage (4 x 4 = 16 tokens)
TOL = 1e-5


def images(batch=3, seed=5, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vmamba():
    return arch.build("vmamba")


@pytest.fixture(scope="module")
def pruned(vmamba):
    return mambaprune.compile_pruned(vmamba, schedule={SITE: 0.5})


# ---------------------------------------------------------------------------------------------
# the hand-written reference
# ---------------------------------------------------------------------------------------------
def sequential_scan(u, delta, A, B, C, D):
    """Token-by-token Mamba-1 scan. u, delta (b, d, l) (delta after softplus); A (d, n); B, C (b, n, l)."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[..., t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[..., t])
    return torch.stack(ys, dim=-1)


def direction_orders(pos, H, W):
    """For each direction, the kept slots (row-major sorted) in the order that direction visits them."""
    column_rank = (pos % W) * H + pos // W
    row = torch.arange(pos.shape[1]).expand_as(pos)
    column = torch.argsort(column_rank, dim=1)
    return [row, column, row.flip(-1), column.flip(-1)]


def take(x, order):
    """x (b, c, k) -> x[b, :, order[b]]."""
    return x.gather(2, order[:, None, :].expand(-1, x.shape[1], -1))


def kept_ss2d(op, t, pos, H, W, orders=direction_orders):
    """SS2D on the kept tokens t (b, C, K, 1) at row-major cells pos (b, K)."""
    b = pos.shape[0]
    x, z = op.in_proj(t).chunk(2, dim=1)                                   # (b, D, K, 1) each
    D = x.shape[1]
    grid = x.new_zeros(b, D, H * W).scatter(2, pos[:, None, :].expand(-1, D, -1), x[..., 0])
    conv = op.conv2d(grid.view(b, D, H, W)).flatten(2)
    x = F.silu(conv.gather(2, pos[:, None, :].expand(-1, D, -1)))          # (b, D, K)
    A = -torch.exp(op.A_logs.float())
    R, N = op.dt_rank, op.d_state
    merged = torch.zeros_like(x)
    for k, order in enumerate(orders(pos, H, W)):
        xs = take(x, order)
        dbl = torch.einsum("bdl,cd->bcl", xs, op.x_proj_weight[k])
        dt, Bk, Ck = torch.split(dbl, [R, N, N], dim=1)
        dt = torch.einsum("brl,dr->bdl", dt, op.dt_projs_weight[k]) + op.dt_projs_bias[k][:, None]
        channels = slice(k * D, (k + 1) * D)
        y = sequential_scan(xs, F.softplus(dt), A[channels], Bk, Ck, op.Ds[channels])
        merged = merged.scatter_add(2, order[:, None, :].expand(-1, D, -1), y)  # back to the kept positions
    y = op.out_norm(merged[..., None]) * F.silu(z)
    return op.out_proj(y)


def kept_block(block, t, pos, H, W):
    """A VSSBlock on the kept cells t (b, C, K, 1) at row-major cells pos (b, K)."""
    t = t + kept_ss2d(block.op, block.norm(t), pos, H, W)
    return t + block.mlp(block.norm2(t))


def cells(x, pos):
    """(b, C, H, W) -> the cells pos (b, K) as (b, C, K, 1)."""
    return x.flatten(2).gather(2, pos[:, None, :].expand(-1, x.shape[1], -1))[..., None]


def put(grid, t, pos):
    """The flattened grid (b, C, H * W) with the cells t (b, C, K, 1) written at pos (b, K)."""
    return grid.scatter(2, pos[:, None, :].expand(-1, grid.shape[1], -1), t[..., 0])


def reference_first_stage(model, img, pos, stage_fill):
    """Dense up to site 1, stages.0.blocks.1 on the kept cells only, the 8 x 8 grid restored (pruned
    cells: the stream at the site, or zeros), then the downsampling and stage 1 dense."""
    stage0, stage1 = model.stages
    x = stage0["blocks"][0](model.patch_embed(img))
    t = kept_block(stage0["blocks"][1], cells(x, pos), pos, *x.shape[2:])
    base = x.flatten(2) if stage_fill == "carry" else torch.zeros_like(x.flatten(2))
    y = stage1["blocks"](stage0["downsample"](put(base, t, pos).view_as(x)))
    return model.head(model.norm(y).mean(dim=(2, 3)))


def reference(model, img, pos, orders=direction_orders):
    """The model dense up to the site, then its last block on the kept tokens only."""
    stage0, stage1 = model.stages
    x = stage1["blocks"][0](stage0["downsample"](stage0["blocks"](model.patch_embed(img))))
    _, C, H, W = x.shape
    t = x.flatten(2).gather(2, pos[:, None, :].expand(-1, C, -1))[..., None]   # (b, C, K, 1)
    block = stage1["blocks"][1]
    t = t + kept_ss2d(block.op, block.norm(t), pos, H, W, orders)
    t = t + block.mlp(block.norm2(t))
    return model.head(model.norm(t).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_reference_with_every_token_reproduces_the_model(vmamba):
    """The reference itself is right: with all 16 cells kept it is the dense model."""
    x = images()
    pos = torch.arange(16).expand(x.shape[0], 16)
    with torch.no_grad():
        assert (reference(vmamba, x, pos) - vmamba(x)).abs().max() <= TOL


def test_site_with_every_token_kept_reproduces_the_model(vmamba):
    keep_all = mambaprune.compile_pruned(vmamba, schedule={SITE: 1.0})
    assert keep_all.report.sites == {SITE: 16}
    x = images()
    with torch.no_grad():
        assert (keep_all(x) - vmamba(x)).abs().max() <= TOL


def test_pruned_last_stage_matches_the_hand_written_reference(vmamba, pruned):
    x = images()
    pos = pruned.kept_positions(x)[SITE]
    assert pos.shape == (3, 8) and bool((pos.diff(dim=1) > 0).all())
    with torch.no_grad():
        out, ref, dense = pruned(x), reference(vmamba, x, pos), vmamba(x)
    assert (out - ref).abs().max() <= TOL
    assert (out - dense).abs().max() > 1e-3, "pruning changed nothing"


def test_every_direction_sees_its_own_order(vmamba, pruned):
    """Scanning the column-major direction in row-major order (a plausible wrong rewrite) is detectably wrong."""
    def row_major_only(pos, H, W):
        orders = direction_orders(pos, H, W)
        return [orders[0], orders[0], orders[2], orders[2]]

    x = images()
    pos = pruned.kept_positions(x)[SITE]
    with torch.no_grad():
        out = pruned(x)
        right = (out - reference(vmamba, x, pos)).abs().max()
        wrong = (out - reference(vmamba, x, pos, row_major_only)).abs().max()
    # the tiny model's scan adds little to its logits: the wrong order is ~1e-4 away, the right one ~1e-7
    assert right <= TOL < wrong / 4 and wrong > 100 * right


@pytest.mark.parametrize("stage_fill", ["carry", "zeros"])
def test_pruned_first_stage_restored_before_the_downsampling_matches_the_reference(vmamba, stage_fill):
    fast = mambaprune.compile_pruned(vmamba, schedule={1: 0.5}, stage_fill=stage_fill)
    x = images()
    pos = fast.kept_positions(x)[1]
    assert pos.shape == (3, 32)
    with torch.no_grad():
        out, ref, dense = fast(x), reference_first_stage(vmamba, x, pos, stage_fill), vmamba(x)
    assert (out - ref).abs().max() <= TOL
    assert (out - dense).abs().max() > 1e-3, "pruning changed nothing"


def test_novelty_on_a_grid_keeps_the_cells_farthest_from_the_mean_cell(vmamba):
    """The default metric reads the (B, C, H, W) stream crossing the site, cells in row-major order."""
    fast = mambaprune.compile_pruned(vmamba, schedule={1: 0.5})
    x = images()
    with torch.no_grad():
        stream = vmamba.stages[0]["blocks"][0](vmamba.patch_embed(x)).flatten(2)      # (b, C, 64)
    scores = (stream - stream.mean(2, keepdim=True)).norm(dim=1)
    expected = scores.topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(fast.kept_positions(x)[1], expected)


def test_two_sites_in_one_stage_each_pruned_cell_carries_the_value_at_its_own_site():
    """4 stages; stage 2 (4 x 4 cells, 4 blocks) pruned after its blocks 0 and 1: 16 -> 8 -> 4 cells.
    Before the downsampling, the cells dropped at the first site hold the stream there, those dropped
    at the second site the stream there, the 4 kept cells their final values."""
    model = arch.build("vmamba_4_stages")
    fast = mambaprune.compile_pruned(model, schedule={5: 0.5, 6: 0.5})
    assert fast.report.sites == {5: 8, 6: 4}
    x = images(size=64)
    kept = fast.kept_positions(x)
    first, second = kept[5], kept[6]
    assert bool(torch.isin(second, first).all())
    s0, s1, s2, s3 = model.stages
    with torch.no_grad():
        h = s2["blocks"][0](s1["downsample"](s1["blocks"](s0["downsample"](s0["blocks"](model.patch_embed(x))))))
        H, W = h.shape[2:]
        at_second = kept_block(s2["blocks"][1], cells(h, first), first, H, W)      # the 8 cells at site 6
        slots = (first[:, :, None] == second[:, None, :]).float().argmax(1)      # second's slots in first
        t = at_second[..., 0].gather(2, slots[:, None, :].expand(-1, h.shape[1], -1))[..., None]
        for block in (s2["blocks"][2], s2["blocks"][3]):
            t = kept_block(block, t, second, H, W)
        grid = put(put(h.flatten(2), at_second, first), t, second).view_as(h)
        y = s3["blocks"](s2["downsample"](grid))
        ref = model.head(model.norm(y).mean(dim=(2, 3)))
        assert (fast(x) - ref).abs().max() <= TOL


def test_report_names_the_directions_and_the_sites_at_a_stage_end(pruned):
    report = pruned.report
    assert list(report.sites) == [SITE]
    assert set(report.unprunable_sites) == {2}
    assert "last of its stage" in report.unprunable_sites[2]
    assert report.blocks[0].mixing.startswith("1 scan (4 directions in one call: identity, permutation, flip")
    assert report.pruned_flops < report.dense_flops


def test_batch_invariance(pruned):
    x = images(batch=4, seed=9)
    with torch.no_grad():
        batched = pruned(x)
        for i in (0, 3):
            assert (pruned(x[i:i + 1])[0] - batched[i]).abs().max() <= TOL


@pytest.mark.parametrize("options", [dict(metric="delta"), dict(alignment="none"), dict(alignment="none-unsorted")])
def test_other_metrics_and_alignments_run(vmamba, options):
    """`delta` scores each direction's channels in its own order; the ViT-style modes compact the grid."""
    fast = mambaprune.compile_pruned(vmamba, schedule={SITE: 0.5}, **options)
    x = images()
    with torch.no_grad():
        out = fast(x)
    assert out.shape == vmamba(x).shape and bool(torch.isfinite(out).all())
    assert fast.kept_positions(x)[SITE].shape == (3, 8)


def test_carry_reaches_the_stream_through_a_per_token_conv_before_the_downsampling():
    """A 1x1 conv that changes the channels before the strided conv: carry puts the stream back at every pruned
    cell and re-runs the 1x1 conv densely on it, so the pruned model equals the same model with the 1x1 conv
    folded into the strided one (which reads the stream itself); zeros and nearest work too."""
    torch.manual_seed(0)
    model = arch.build("vmamba").eval()
    linear, conv = arch.Linear2d(24, 32), nn.Conv2d(32, 48, 2, stride=2)
    model.stages[0]["downsample"] = nn.Sequential(linear, conv, arch.LayerNorm2d(48))
    folded = copy.deepcopy(model)
    merged = nn.Conv2d(24, 48, 2, stride=2)
    with torch.no_grad():
        merged.weight.copy_(torch.einsum("omhw,mi->oihw", conv.weight, linear.weight))
        merged.bias.copy_(conv.bias + torch.einsum("omhw,m->o", conv.weight, linear.bias))
    folded.stages[0]["downsample"] = nn.Sequential(merged, copy.deepcopy(model.stages[0]["downsample"][2]))
    x = images(batch=2)
    fast = mambaprune.compile_pruned(model, schedule={1: 0.5})
    reference = mambaprune.compile_pruned(folded, schedule={1: 0.5})
    assert fast.report.sites == reference.report.sites == {1: 32}
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-4, atol=1e-4)
    # the pruned-run check re-runs the 1x1 conv on the carried stream in the masked dense run too
    assert [o.compared_with for o in fast.report.verified.outputs] == ["masked"], fast.report.verified.describe()
    for fill in ("zeros", "nearest"):
        assert mambaprune.compile_pruned(model, schedule={1: 0.5}, fill=fill).report.sites == {1: 32}


def test_decay_is_refused_for_a_grouped_scan_in_several_orders(vmamba):
    with pytest.raises(UnsupportedModelError, match="decay.*ONE call"):
        mambaprune.compile_pruned(vmamba, schedule={SITE: 0.5}, alignment="decay")


@pytest.mark.parametrize("name, reason", [
    ("vmamba_interleaved", "interleaves directions folded into one tensor with another axis"),
    ("vmamba_unmerged", "combines tensors whose tokens are in different orders"),
    ("vmamba_groups_mismatched", "do not match the groups of B/C in order"),
])
def test_directions_the_analyser_cannot_prove_are_refused(name, reason):
    model = arch.build(name)
    dense = mambaprune.compile_pruned(model, ratio=0.0)
    assert any(reason in r for _, r in dense.report.not_understood), dense.report.not_understood
    assert dense.report.unprunable_sites and all(reason in r or "never merge" in r
                                                 for r in dense.report.unprunable_sites.values())
    with pytest.raises(ValueError, match=reason):
        mambaprune.compile_pruned(model, schedule={SITE: 0.5})


# ---------------------------------------------------------------------------------------------
# the analysis facts behind the rewrite
# ---------------------------------------------------------------------------------------------
def test_cross_scan_is_the_four_orders_and_the_block_output_is_the_full_merge(vmamba):
    analysis = analyse(capture(vmamba, (images(batch=2),)).gm)
    block = analysis.blocks[3]
    identity = Layout.identity(16)
    column = Layout(np.arange(16).reshape(4, 4).T.reshape(-1))
    assert fact_of(block.scans[0]) == MultiTok(2, 1, (identity, column, identity.reversed(), column.reversed()))
    # ys[:, 0] + ys[:, 2].flip() is a Tok in identity order too, but only the sum with the
    # un-transposed column-major part has every direction in it
    assert fact_of(block.y) == Tok(2, identity)
    assert block.y.target == torch.ops.aten.add.Tensor
    assert {a.target for a in block.y.args} == {torch.ops.aten.select.int, torch.ops.aten.view.default}


class _EinsumOverTokens(nn.Module):
    """A grouped scan whose B is computed by an einsum that sums over the token axis: refused."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.A_log = nn.Parameter(torch.zeros(16, 2))
        self.D = nn.Parameter(torch.ones(16))

    def forward(self, x):                                  # x: (B, 16, 8) tokens x channels
        u = self.proj(x).transpose(1, 2)                  # (B, 8, 16)
        xs = torch.stack([u, u.flip(-1)], dim=1)          # (B, 2, 8, 16): two directions
        mixed = torch.einsum("bkdl,bkdm->bkdl", xs, xs)   # sums over a second copy of the tokens
        Bs = mixed[:, :, :2]
        ys = selective_scan(xs.reshape(x.shape[0], -1, 16), xs.reshape(x.shape[0], -1, 16).sigmoid(),
                            -torch.exp(self.A_log), Bs, Bs, self.D)
        ys = ys.view(x.shape[0], 2, 8, 16)
        return (ys[:, 0] + ys[:, 1].flip(-1)).mean(-1)


def test_an_einsum_that_mixes_the_tokens_is_refused():
    gm = capture(_EinsumOverTokens().eval(), (torch.randn(2, 16, 8),)).gm
    analyse(gm)
    reasons = [fact_of(n).reason for n in gm.graph.nodes if isinstance(fact_of(n), Unknown)]
    assert reasons and "einsum of two token tensors" in reasons[0], reasons


def test_restored_stages_export_to_onnx_and_match(tmp_path):
    """The restore (scatter into the carried stream) is plain torch: it exports and runs in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = arch.build("vmamba_4_stages")
    fast = mambaprune.compile_pruned(model, ratio=0.3)
    x = images(size=64)
    session = ort.InferenceSession(str(fast.export(tmp_path / "vmamba.onnx")))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(got) - fast(x)).abs().max() <= 1e-4
