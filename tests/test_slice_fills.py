"""capture/slice_fills.py: allocations filled by slice writes become the cat they compute, and only
those whose every write and read is understood (anything else is left for the analysis to refuse)."""
from __future__ import annotations

import torch
import torch.nn as nn

from mambaprune.capture import capture

aten = torch.ops.aten


class CrossScan(nn.Module):
    """VMamba's torch cross-scan: four directions written into new_empty, the flips read back from it."""

    def forward(self, x):
        B, C, H, W = x.shape
        xs = x.new_empty((B, 4, C, H * W))
        xs[:, 0] = x.flatten(2, 3)
        xs[:, 1] = x.transpose(2, 3).flatten(2, 3)
        xs[:, 2:4] = torch.flip(xs[:, 0:2], dims=[-1])
        return xs * 2


class Overwritten(nn.Module):
    """A read between writes sees what was written before it, a later write replaces part of a run."""

    def forward(self, x):
        ys = torch.empty_like(x)
        ys[:, 0:3] = x[:, 0:3] + 1
        first = ys[:, 1:3].sum(1)
        ys[:, 3:] = x[:, 3:] * 2
        ys[:, 1] = x[:, 0]
        return ys - first[:, None]


class WrittenThroughAView(nn.Module):
    """An in-place op through a permuted view: the pass cannot express it, so it leaves the allocation."""

    def forward(self, x):
        ys = x.new_empty((x.shape[0], 2, x.shape[1]))
        ys[:, 0] = x
        ys[:, 1] = -x
        ys.permute(0, 2, 1).mul_(3)
        return ys + 1


class ViewedBeforeALaterWrite(nn.Module):
    """A view taken before a write sees that write (it aliases the allocation): not a value at one time."""

    def forward(self, x):
        ys = x.new_empty((x.shape[0], 2, x.shape[1]))
        ys[:, 0] = x
        ys[:, 1] = -x
        seen = ys.permute(0, 2, 1)
        ys[:, 1] = 2 * x
        return seen + 1


class ReadBeforeWritten(nn.Module):
    def forward(self, x):
        ys = x.new_empty((x.shape[0], 2, x.shape[1]))
        ys[:, 0] = x
        partial = ys.sum(1)          # reads ys[:, 1] before anything was written there
        ys[:, 1] = x
        return ys + partial[:, None]


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_a_cross_scan_filled_by_slices_becomes_data_movement_with_the_same_values():
    x = torch.randn(2, 3, 4, 5)
    gm = capture(CrossScan(), (x,)).gm
    assert aten.copy_.default not in targets(gm) and aten.new_empty.default not in targets(gm)
    assert aten.cat.default in targets(gm)
    torch.testing.assert_close(gm(x), CrossScan()(x), rtol=0, atol=0)
    other = torch.randn(3, 3, 4, 5)                    # another batch: the dynamic dimension survived
    torch.testing.assert_close(gm(other), CrossScan()(other), rtol=0, atol=0)


def test_reads_between_writes_see_what_was_written_before_them():
    x = torch.randn(2, 6, 3)
    gm = capture(Overwritten(), (x,)).gm
    assert aten.copy_.default not in targets(gm)
    torch.testing.assert_close(gm(x), Overwritten()(x), rtol=0, atol=0)


def test_a_write_through_another_view_a_view_before_a_write_or_an_unwritten_read_is_left_as_it_is():
    for model in (WrittenThroughAView(), ViewedBeforeALaterWrite(), ReadBeforeWritten()):
        x = torch.randn(2, 5)
        gm = capture(model, (x,)).gm
        assert aten.copy_.default in targets(gm), type(model).__name__
        if not isinstance(model, ReadBeforeWritten):
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)

