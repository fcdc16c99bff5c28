"""capture/lattice_fills.py: allocations filled by strided slice writes (one write per residue class of
a stride) become the interleave they compute, and only those whose every write and read is understood;
a model whose two scan directions are interleaved along the channels that way is pruned with the
standard checks (refused before the pass: the writes hid where the tokens went)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mambaprune
from mambaprune.capture import capture
from tests.official_zoo import checks

aten = torch.ops.aten


class AtrousMerge(nn.Module):
    """EfficientVMamba's merge: four sub-grids written back by residue (two of them transposed)."""

    def forward(self, ys):
        B, K, C, L = ys.shape
        H = W = int(L ** 0.5)
        y = ys.new_empty((B, C, 2 * H, 2 * W))
        y[:, :, ::2, ::2] = ys[:, 0].reshape(B, C, H, W)
        y[:, :, 1::2, ::2] = ys[:, 1].reshape(B, C, W, H).transpose(2, 3)
        y[:, :, ::2, 1::2] = ys[:, 2].reshape(B, C, H, W)
        y[:, :, 1::2, 1::2] = ys[:, 3].reshape(B, C, W, H).transpose(2, 3)
        return y.view(B, C, -1) * 2


class ThreeResidues(nn.Module):
    """One strided axis, stride 3, written out of order, read twice."""

    def forward(self, x):
        out = torch.empty_like(x)
        out[:, 2::3] = x[:, 2::3] * 3
        out[:, 0::3] = x[:, 0::3] + 1
        out[:, 1::3] = -x[:, 1::3]
        return out.sum(-1) + out[..., 0]


class MissingResidue(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        out[:, 0::2, 0::2] = x[:, 0::2, 0::2]
        out[:, 1::2, 0::2] = x[:, 1::2, 0::2]
        out[:, 0::2, 1::2] = x[:, 0::2, 1::2]          # (1, 1) is never written
        return out


class ReadBetweenWrites(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        out[:, 0::2] = x[:, 0::2]
        early = out.sum(1)                              # half of it is unwritten here
        out[:, 1::2] = x[:, 1::2]
        return out + early[:, None]


class WrittenTwice(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        out[:, 0::2] = x[:, 0::2]
        out[:, 1::2] = x[:, 1::2]
        out[:, 1::2] = 2 * x[:, 1::2]                   # the last write wins: not one value per residue
        return out


class MixedStrides(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        out[:, 0::2] = x[:, 0::2]
        out[:, 1::4] = x[:, 1::4]
        out[:, 3::4] = x[:, 3::4]
        return out


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_the_atrous_merge_becomes_data_movement_with_the_same_values_at_any_batch():
    ys = torch.randn(2, 4, 3, 9)
    gm = capture(AtrousMerge(), (ys,)).gm
    assert not targets(gm) & {aten.copy_.default, aten.new_empty.default, aten.slice.Tensor}
    assert aten.stack.default in targets(gm)
    for batch in (2, 5):
        other = torch.randn(batch, 4, 3, 9)
        torch.testing.assert_close(gm(other), AtrousMerge()(other), rtol=0, atol=0)


def test_one_strided_axis_written_out_of_order_and_read_twice():
    x = torch.randn(2, 9, 4)
    gm = capture(ThreeResidues(), (x,)).gm
    assert aten.copy_.default not in targets(gm) and aten.empty_like.default not in targets(gm)
    torch.testing.assert_close(gm(x), ThreeResidues()(x), rtol=0, atol=0)


@pytest.mark.parametrize("model", [MissingResidue(), ReadBetweenWrites(), WrittenTwice(), MixedStrides()],
                         ids=lambda m: type(m).__name__)
def test_fills_that_are_not_one_write_per_residue_before_every_read_are_left_as_they_are(model):
    x = torch.randn(2, 8, 4)
    gm = capture(model, (x,)).gm
    assert aten.copy_.default in targets(gm)
    if not isinstance(model, (MissingResidue, ReadBetweenWrites)):      # those read uninitialised memory
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_stride_that_does_not_divide_the_axis_is_left_as_it_is():
    x = torch.randn(2, 7, 4)
    gm = capture(ThreeResidues(), (x,)).gm              # 7 rows: residues of unequal sizes
    assert aten.copy_.default in targets(gm)
    torch.testing.assert_close(gm(x), ThreeResidues()(x), rtol=0, atol=0)


class InterleavedDirections(nn.Module):
    """Patches -> blocks whose two scan directions (forwards, backwards) are interleaved along the channels
    by strided writes (`y[:, 0::2] = forwards; y[:, 1::2] = backwards`) before the out projection -> head."""

    def __init__(self, dim=16, depth=3, img_size=16, patch=4, n=4):
        super().__init__()
        self.img_size, self.n = img_size, n
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.in_projs = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.x_projs = nn.ModuleList(nn.Linear(dim, 2 * (dim + 2 * n)) for _ in range(depth))
        self.A_logs = nn.ParameterList(nn.Parameter(torch.rand(2, dim, n)) for _ in range(depth))
        self.out_projs = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def scan(self, u, parts, A):
        delta, B, C = torch.split(parts, [u.shape[1], self.n, self.n], dim=-1)
        return mambaprune.selective_scan(u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                                         delta_softplus=True)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        for norm, in_proj, x_proj, A_log, out_proj in zip(self.norms, self.in_projs, self.x_projs, self.A_logs,
                                                         self.out_projs):
            h = in_proj(norm(x))
            fwd_parts, bwd_parts = x_proj(h).chunk(2, dim=-1)
            u = h.transpose(1, 2)
            forwards = self.scan(u, fwd_parts, -torch.exp(A_log[0]))
            backwards = self.scan(u.flip(-1), bwd_parts.flip(1), -torch.exp(A_log[1])).flip(-1)
            y = forwards.new_empty((u.shape[0], 2 * u.shape[1], u.shape[2]))
            y[:, 0::2] = forwards
            y[:, 1::2] = backwards
            x = x + out_proj(y.transpose(1, 2))
        return self.head(x.mean(1))


def test_a_model_whose_directions_are_interleaved_by_strided_writes_is_pruned_with_the_standard_checks():
    torch.manual_seed(0)
    model = InterleavedDirections().eval()
    out = checks.run("interleaved directions", model, model.img_size)
    assert checks.green(out), out
