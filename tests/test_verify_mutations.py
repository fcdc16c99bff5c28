"""Mutation tests of `verify`: deliberate faults injected into the rewrite must be refused.

Each fault is monkeypatched into mambaprune.rewrite / mambaprune.runtime.token_index for one build;
`build(..., verify=True)` must raise UnsupportedModelError. Most of them are right when every token
is kept (an index that is wrong only when some are dropped), and for those the keep-all check alone
(`verify_rewrite`) must NOT refuse them: only the pruned-run check (rewrite/verify_pruned.py) sees
them. Without any fault every configuration builds and verifies (test_faultless_builds_verify).
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))

import architectures as arch  # noqa: E402

import mambaprune.rewrite.rules.conv1d as conv1d_rule  # noqa: E402
import mambaprune.rewrite.rules.conv2d as conv2d_rule  # noqa: E402
import mambaprune.rewrite.restore as restore  # noqa: E402
from mambaprune.api.compile import build, prepare  # noqa: E402
from mambaprune.errors import UnsupportedModelError  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.rewrite import SiteSpec, verify_pruned_run, verify_rewrite  # noqa: E402
from mambaprune.rewrite.indices import IndexTables  # noqa: E402
from mambaprune.rewrite.rules import ScanGaps  # noqa: E402
from mambaprune.runtime import token_index as ti  # noqa: E402
from mambaprune.runtime import token_merge as tm  # noqa: E402
from mambaprune.settings import PruneSettings  # noqa: E402


class TokenFeatures(nn.Module):
    """A tiny ViM returning the token features (h + residual) after two blocks, both after its site."""

    def __init__(self, blocks=(4, 5)):
        super().__init__()
        self.v, self.blocks = create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10), blocks

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


def _vim():
    return create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10)


def _vmamba_channels_before_downsampling():
    """The stage's stream through a 1x1 conv that changes the channels before the strided conv: fill='carry'
    re-runs the 1x1 conv on the carried stream."""
    model = arch.VMambaStyle(depths=(2, 3))
    model.stages[0]["downsample"] = nn.Sequential(arch.Linear2d(24, 32), nn.Conv2d(32, 48, 2, stride=2),
                                                  arch.LayerNorm2d(48))
    return model


MODELS = {
    "vim": _vim,                                           # middle class token, flipped direction, conv1d
    "features": TokenFeatures,                              # token outputs restored at full length
    "vmamba": lambda: arch.VMambaStyle(depths=(2, 3)),     # cross-scan, conv2d, a stage end
    "vmamba_channels": _vmamba_channels_before_downsampling,          # carry through a per-token conv
    "hierarchical_vim": lambda: arch.HierarchicalVim(depths=(3, 3)),   # two sites in a stage, carry fill
    "plainmamba": lambda: create_model("plainmamba_l1", img_size=32, patch_size=4, depth=6, embed_dim=32,
                                       d_state=4, num_classes=10),     # zig-zag scans, dt/B/C in raster order
    "cls_sliced": lambda: arch.build("cls_sliced_middle"),          # a class token cut out before every mixer
    "segmenter": lambda: create_model("vim_t_seg", img_size=64, depth=6, embed_dim=32, out_indices=(1, 3, 5),
                                      decoder_width=16),               # a decoder on restored maps
}
CONFIGS = {   # model, settings
    "vim-hold": ("vim", dict(schedule={2: 0.6, 4: 0.7})),
    "vim-decay": ("vim", dict(schedule={2: 0.4, 4: 0.5}, alignment="decay")),
    "features-hold": ("features", dict(schedule={2: 0.6})),
    "vmamba-hold": ("vmamba", dict(schedule={3: 0.5})),
    "vmamba-stage": ("vmamba", dict(schedule={1: 0.6})),
    "hierarchical-carry": ("hierarchical_vim", dict(schedule={1: 0.7, 2: 0.7})),
    "plainmamba-hold": ("plainmamba", dict(schedule={2: 0.6, 4: 0.7})),
    "features-nearest": ("features", dict(schedule={2: 0.6}, fill="nearest")),
    "features-zeros": ("features", dict(schedule={2: 0.6}, fill="zeros")),
    "vmamba-stage-nearest": ("vmamba", dict(schedule={1: 0.6}, fill="nearest")),
    "vmamba-channels-carry": ("vmamba_channels", dict(schedule={1: 0.6})),
    "segmenter-nearest": ("segmenter", dict(schedule={2: 0.6}, fill="nearest")),
    "segmenter-zeros": ("segmenter", dict(schedule={2: 0.6}, fill="zeros")),
    "vim-none": ("vim", dict(schedule={2: 0.6, 4: 0.7}, alignment="none")),
    "features-none": ("features", dict(schedule={2: 0.6}, alignment="none")),
    "vmamba-none": ("vmamba", dict(schedule={1: 0.6}, alignment="none")),
    "plainmamba-none": ("plainmamba", dict(schedule={2: 0.6, 4: 0.7}, alignment="none")),
    "segmenter-none-nearest": ("segmenter", dict(schedule={2: 0.6}, alignment="none", fill="nearest")),
    "features-unsorted-nearest": ("features", dict(schedule={2: 0.6}, alignment="none-unsorted", fill="nearest")),
    "vim-merge-nearest": ("vim", dict(schedule={2: 0.6, 4: 0.7}, reduction="merge-nearest")),
    "vim-merge-similar-none": ("vim", dict(schedule={2: 0.6, 4: 0.7}, reduction="merge-similar", alignment="none")),
    "plainmamba-merge-nearest": ("plainmamba", dict(schedule={2: 0.6, 4: 0.7}, reduction="merge-nearest")),
    "vmamba-merge-zeros": ("vmamba", dict(schedule={1: 0.6}, reduction="merge-similar", fill="zeros")),
    "segmenter-carry": ("segmenter", dict(schedule={2: 0.6})),
    "cls-sliced-none": ("cls_sliced", dict(schedule={1: 0.6, 2: 0.7}, alignment="none")),
    "vmamba-merge-carry": ("vmamba", dict(schedule={1: 0.6}, reduction="merge-similar")),
    "hierarchical-merge-carry": ("hierarchical_vim", dict(schedule={1: 0.7, 2: 0.7}, reduction="merge-nearest")),
}


@pytest.fixture(scope="module")
def prepared():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = MODELS[name]().eval()
            size = {"vim": 64, "features": 64, "plainmamba": 32, "segmenter": 64}.get(name) or model.img_size
            cache[name] = prepare(model, (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),))
        return cache[name]
    return get


# ---------------------------------------------------------------------------------------- faults
def _compacted(index: torch.Tensor) -> torch.Tensor:
    """0..K-1 per row: where the kept tokens would be if the pruned sequence were the whole one."""
    return torch.arange(index.shape[1], device=index.device).expand_as(index)


def conv1d_at_compacted_positions(mp):
    """The conv1d neighbourhood fix skipped: windows over the compacted sequence."""
    original = conv1d_rule.pos_conv1d

    def pos_conv1d(x, weight, bias, pos, left):
        return original(x, weight, bias, _compacted(pos), left)
    mp.setattr(conv1d_rule, "pos_conv1d", pos_conv1d)


def conv1d_window_off_by_one(mp):
    original = conv1d_rule.pos_conv1d

    def pos_conv1d(x, weight, bias, pos, left):
        return original(x, weight, bias, pos, left - 1)
    mp.setattr(conv1d_rule, "pos_conv1d", pos_conv1d)


def conv2d_at_compacted_cells(mp):
    """The conv2d neighbourhood fix skipped: the kept cells scattered to the first K cells of the grid."""
    def scatter_grid(x, index, height, width, hdim, wdim):
        return ti.scatter_grid(x, _compacted(index), height, width, hdim, wdim)

    def gather_grid(x, index, hdim, wdim):
        return ti.gather_grid(x, _compacted(index), hdim, wdim)
    mp.setattr(conv2d_rule, "ti", types.SimpleNamespace(scatter_grid=scatter_grid, gather_grid=gather_grid))


def scan_order_not_inverted(mp):
    """The wrong inverse of a scan order: the order itself (right for the whole cross-scan, whose
    orders are involutions, wrong for the original path restricted to the kept tokens)."""
    def inverse_order(order):
        return order
    mp.setattr(ti, "inverse_order", inverse_order)


def readout_of_compacted_slot(mp):
    """The class token read at its dense slot (clipped to K - 1) instead of the slot that holds it."""
    def slot_of_position(positions, position):
        return torch.full((positions.shape[0],), min(position, positions.shape[1] - 1), dtype=torch.int64)
    mp.setattr(ti, "slot_of_position", slot_of_position)


def output_restored_at_compacted_slots(mp):
    """A token output put back at slots 0..K-1 instead of the kept tokens' positions."""
    mp.setattr(restore, "scatter_tokens", lambda x, index, length, dim, _f=restore.scatter_tokens:
               _f(x, _compacted(index), length, dim))
    mp.setattr(restore, "put_tokens", lambda base, x, index, dim, _f=restore.put_tokens:
               _f(base, x, _compacted(index), dim))


def output_restored_one_slot_off(mp):
    """A token output put back with every kept token at its neighbour's position."""
    mp.setattr(restore, "scatter_tokens", lambda x, index, length, dim, _f=restore.scatter_tokens:
               _f(x, index.roll(1, dims=1), length, dim))
    mp.setattr(restore, "put_tokens", lambda base, x, index, dim, _f=restore.put_tokens:
               _f(base, x, index.roll(1, dims=1), dim))


def restore_fills_zeros(mp):
    """The restore before the downsampling ignores fill='carry': pruned cells hold zeros."""
    original = restore.crossing_stream

    def crossing_stream(ctx, like, key, at):
        return ctx.call(torch.zeros_like, original(ctx, like, key, at))
    mp.setattr(restore, "crossing_stream", crossing_stream)


def carry_skips_the_chain(mp):
    """The per-token ops between the stream and the downsampling re-run on the pruned stream scattered with
    zeros, as if the carried values were never put back."""
    mp.setattr(restore, "carried_stream", lambda ctx, stream: restore.scattered(
        ctx, ctx.env[stream], ctx.state.of(ctx.env[stream]).fact,
        ctx.tables.dense_index(ctx.state.of(ctx.env[stream]).site, ctx.state.of(ctx.env[stream]).fact.layout)))


def restore_carries_first_site(mp):
    """Cells pruned at the second site of a stage carry the stream of the first site."""
    mp.setattr(IndexTables, "sites_up_to", lambda self, site: self.site_order[:1])


def decay_gaps_ignored(mp):
    mp.setattr(ScanGaps, "matches", lambda self, ctx, old, args: False)


def decay_gaps_off_by_one(mp):
    """The gap counts the pruned steps between two kept tokens instead of the steps (g - 1)."""
    def path_gaps(ranks):
        return torch.cat([ranks[:, :1] + 1, ranks[:, 1:] - ranks[:, :-1] - 1], dim=1).to(torch.float32)
    mp.setattr(ti, "path_gaps", path_gaps)


def none_claims_original_positions(mp):
    """Under `none` the kept tokens claim their original positions (hold's), not 0..K-1."""
    mp.setattr(ti, "compacted_positions", lambda index: index)


def nearest_ties_in_slot_order(mp):
    """fill='nearest' breaks ties between equally near kept tokens by the order the pruned slots hold them
    (under none-unsorted: score order) instead of by their positions (the defect this check found)."""
    def nearest_kept(index, coords):
        kept = coords.to(index.device)[index]
        return ((coords.unsqueeze(0).unsqueeze(2) - kept.unsqueeze(1)) ** 2).sum(-1).argmin(dim=-1)
    mp.setattr(ti, "nearest_kept", nearest_kept)


def merge_ignores_sizes(mp):
    """A merge averages plainly, as if every token stood for one (right at a stage's first site only)."""
    original = tm.merge_tokens
    mp.setattr(tm, "merge_tokens", lambda x, sel, pruned, target, size, merged_size, dim: original(
        x, sel, pruned, target, None, tm.merged_sizes(None, sel, pruned, target), dim))


def merge_into_protected_tokens(mp):
    """Pruned tokens may be merged into the class token."""
    mp.setattr(tm, "kept_is_protected", lambda positions, protected: torch.zeros_like(positions, dtype=torch.bool))


def merge_into_the_next_kept_token(mp):
    """merge-nearest's target one kept slot off."""
    original = tm.nearest_targets
    mp.setattr(tm, "nearest_targets", lambda prev_idx, sel, *rest: (original(prev_idx, sel, *rest) + 1).clamp(
        max=sel.shape[1] - 1))


def similarity_of_the_wrong_tokens(mp):
    """merge-similar compares the stream's tokens in reversed order: targets chosen for other tokens."""
    original = tm.similar_targets
    mp.setattr(tm, "similar_targets", lambda stream, dim, prev_idx, sel, pruned, protected: original(
        stream.flip(dim), dim, prev_idx, sel, pruned, protected))


def kept_positions_not_sorted(mp):
    original = ti.select_tokens

    def select_tokens(scores, prev_idx, protected, keep, sort):
        return original(scores, prev_idx, protected, keep, False)
    mp.setattr(ti, "select_tokens", select_tokens)


def class_token_not_protected(mp):
    original = ti.select_tokens

    def select_tokens(scores, prev_idx, protected, keep, sort):
        return original(scores, prev_idx, protected[:0], keep, sort)
    mp.setattr(ti, "select_tokens", select_tokens)


def nearest_from_compacted_slots(mp):
    """fill='nearest' measured from the first K slots' coordinates instead of the kept tokens' own."""
    original = ti.nearest_kept
    mp.setattr(ti, "nearest_kept", lambda index, coords: original(_compacted(index), coords))


def nearest_fills_zeros(mp):
    """fill='nearest' ignored where tokens are restored: pruned positions hold zeros."""
    mp.setattr(restore, "nearest", restore.scattered)


def unmerge_into_the_next_kept_token(mp):
    """ToMe's unmerge reads every pruned token's value from the kept slot after the one it was merged into."""
    original = tm.merge_assignment
    mp.setattr(tm, "merge_assignment", lambda sel, pruned, target: original(
        sel, pruned, (target + 1).clamp(max=sel.shape[1] - 1)))


@dataclass(frozen=True)
class Fault:
    inject: Callable
    config: str
    keep_all_sees_it: bool    # whether the keep-all check alone refuses it too


FAULTS = {
    "conv1d at compacted positions": Fault(conv1d_at_compacted_positions, "vim-hold", False),
    "conv1d window off by one": Fault(conv1d_window_off_by_one, "vim-hold", True),
    "conv2d at compacted cells": Fault(conv2d_at_compacted_cells, "vmamba-hold", False),
    "plainmamba conv2d at compacted cells": Fault(conv2d_at_compacted_cells, "plainmamba-hold", False),
    "scan order not inverted": Fault(scan_order_not_inverted, "vmamba-hold", False),
    "readout of the compacted slot": Fault(readout_of_compacted_slot, "vim-hold", False),
    "output restored at compacted slots": Fault(output_restored_at_compacted_slots, "features-hold", False),
    "output restored one slot off": Fault(output_restored_one_slot_off, "features-hold", True),
    "restore fills zeros for carry": Fault(restore_fills_zeros, "vmamba-stage", False),
    "restore fills zeros for carry through a 1x1 conv": Fault(restore_fills_zeros, "vmamba-channels-carry", False),
    "carry skips the 1x1 conv at pruned cells": Fault(carry_skips_the_chain, "vmamba-channels-carry", False),
    "restore carries the first site": Fault(restore_carries_first_site, "hierarchical-carry", False),
    "decay gaps ignored": Fault(decay_gaps_ignored, "vim-decay", False),
    "decay gaps off by one": Fault(decay_gaps_off_by_one, "vim-decay", False),
    "kept positions not sorted": Fault(kept_positions_not_sorted, "vim-hold", True),
    "class token not protected": Fault(class_token_not_protected, "vim-hold", False),
    "nearest from compacted slots (output)": Fault(nearest_from_compacted_slots, "features-nearest", False),
    "nearest from compacted slots (stage end)": Fault(nearest_from_compacted_slots, "vmamba-stage-nearest", False),
    "nearest fills zeros (decoder input)": Fault(nearest_fills_zeros, "segmenter-nearest", False),
    "output restored at compacted slots (zeros fill)": Fault(output_restored_at_compacted_slots, "features-zeros", False),
    "none claims original positions (flip, conv1d)": Fault(none_claims_original_positions, "vim-none", False),
    "none claims original positions (zig-zag)": Fault(none_claims_original_positions, "plainmamba-none", False),
    "none claims original positions (cross-scan, conv2d)": Fault(none_claims_original_positions, "vmamba-none", False),
    "none claims original positions (decoder)": Fault(none_claims_original_positions, "segmenter-none-nearest", False),
    "none claims original positions (class token cut out)": Fault(none_claims_original_positions, "cls-sliced-none",
                                                                  False),
    "output restored at compacted slots (none)": Fault(output_restored_at_compacted_slots, "features-none", False),
    "readout of the compacted slot (none)": Fault(readout_of_compacted_slot, "vim-none", False),
    "nearest ties in slot order": Fault(nearest_ties_in_slot_order, "features-unsorted-nearest", False),
    "merge ignores sizes": Fault(merge_ignores_sizes, "vim-merge-nearest", False),
    "merge into protected tokens": Fault(merge_into_protected_tokens, "vim-merge-nearest", False),
    "merge into the next kept token (grid)": Fault(merge_into_the_next_kept_token, "plainmamba-merge-nearest", False),
    "similarity of the wrong tokens (none)": Fault(similarity_of_the_wrong_tokens, "vim-merge-similar-none", False),
    "similarity of the wrong tokens (stage end)": Fault(similarity_of_the_wrong_tokens, "vmamba-merge-zeros", False),
    "restore fills zeros for carry (token output)": Fault(restore_fills_zeros, "features-hold", False),
    "restore fills zeros for carry (decoder input)": Fault(restore_fills_zeros, "segmenter-carry", False),
    "unmerge into the next kept token (stage end)": Fault(unmerge_into_the_next_kept_token, "vmamba-merge-carry", False),
    "unmerge into the next kept token (two sites of a stage)": Fault(unmerge_into_the_next_kept_token,
                                                                     "hierarchical-merge-carry", False),
}


def _settings(config: str) -> tuple:
    model, settings = CONFIGS[config]
    return model, PruneSettings(ratio=0.3, **settings)


def _sites(prep, settings) -> list:
    pruned = build(prep, settings.with_(verify=False))
    return [SiteSpec(key, keep) for key, keep in pruned.report.sites.items()]


def _keep_all_refuses(prep, sites, settings) -> bool:
    try:
        verify_rewrite(prep.captured.gm, prep.analysis, sites, prep.flat, settings)
    except UnsupportedModelError:
        return True
    return False


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_faultless_builds_verify(prepared, config):
    """Without faults the pruned run agrees with its definitions (so a refusal below is the fault's)."""
    model, settings = _settings(config)
    prep = prepared(model)
    pruned = build(prep, settings)
    sites = [SiteSpec(key, keep) for key, keep in pruned.report.sites.items()]
    assert all(keep < prep.analysis.site_length(key) for key, keep in pruned.report.sites.items())
    check = verify_pruned_run(prep.captured.gm, build(prep, settings.with_(verify=False)).graph_module,
                              prep.analysis, sites, prep.flat, settings)
    assert [o.compared_with for o in check.outputs] == ["masked"] * len(check.outputs)
    assert all(o.difference <= o.tolerance for o in check.outputs)


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_is_refused(prepared, monkeypatch, name):
    fault = FAULTS[name]
    model, settings = _settings(fault.config)
    prep = prepared(model)
    with monkeypatch.context() as mp:
        fault.inject(mp)
        sites = _sites(prep, settings)
        with pytest.raises(UnsupportedModelError, match="could not rewrite|pruned this model wrongly"):
            build(prep, settings)
        assert _keep_all_refuses(prep, sites, settings) == fault.keep_all_sees_it


def test_most_faults_only_the_pruned_run_sees():
    assert len(FAULTS) >= 10
    assert sum(not f.keep_all_sees_it for f in FAULTS.values()) * 2 >= len(FAULTS)
