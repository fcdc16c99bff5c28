"""Tests of the position-aware token ops against their definitions, dense convs, autograd, export, FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mambaprune.runtime import gather_tokens, path_order, pos_conv1d, pos_conv2d, scatter_tokens


def random_positions(batch, kept, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=g)[:kept].sort().values for _ in range(batch)])


def direct_pos_conv1d(x, weight, bias, pos, left):
    """The definition with explicit loops over sample, kept token and tap."""
    batch, channels, tokens = x.shape
    out = torch.zeros(batch, channels, tokens, dtype=torch.float64)
    for b in range(batch):
        slot_of = {int(p): k for k, p in enumerate(pos[b])}
        for k in range(tokens):
            if bias is not None:
                out[b, :, k] += bias.double()
            for j in range(weight.shape[-1]):
                neighbour = slot_of.get(int(pos[b, k]) + j - left)
                if neighbour is not None:
                    out[b, :, k] += weight[:, 0, j].double() * x[b, :, neighbour].double()
    return out


def direct_pos_conv2d(x, weight, bias, pos, height, width, padding):
    batch, tokens, channels = x.shape
    kh, kw = weight.shape[-2:]
    out = torch.zeros(batch, tokens, channels, dtype=torch.float64)
    for b in range(batch):
        slot_of = {int(p): k for k, p in enumerate(pos[b])}
        for k in range(tokens):
            row, col = divmod(int(pos[b, k]), width)
            if bias is not None:
                out[b, k] += bias.double()
            for i in range(kh):
                for j in range(kw):
                    r, c = row + i - padding, col + j - padding
                    neighbour = slot_of.get(r * width + c) if 0 <= r < height and 0 <= c < width else None
                    if neighbour is not None:
                        out[b, k] += weight[:, 0, i, j].double() * x[b, neighbour].double()
    return out


@pytest.mark.parametrize("width,left", [(4, 3), (3, 1), (5, 2), (4, 0), (1, 0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_pos_conv1d_matches_definition(width, left, with_bias):
    batch, channels, kept, length = 3, 5, 9, 20
    x = torch.randn(batch, channels, kept)
    weight = torch.randn(channels, 1, width)
    bias = torch.randn(channels) if with_bias else None
    pos = random_positions(batch, kept, length)
    expected = direct_pos_conv1d(x, weight, bias, pos, left)
    got = pos_conv1d(x, weight, bias, pos, left)
    assert got.shape == x.shape and got.is_contiguous()
    assert (got.double() - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("width,left", [(4, 3), (5, 2), (4, 0)])
def test_pos_conv1d_agrees_across_layouts_over_many_vector_blocks(width, left):
    # channel rows contiguous ((batch, C, K), the official mixers' layout) and a tokens-last view take
    # different CPU kernels; 37 kept tokens span several vector blocks of either with a ragged tail
    pos = random_positions(2, 37, 80)
    rows = torch.randn(2, 20, 37, dtype=torch.float64)
    view = rows.transpose(1, 2).contiguous().transpose(1, 2)
    weight, bias = torch.randn(20, 1, width, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    expected = direct_pos_conv1d(rows, weight, bias, pos, left)
    for x in (rows, view, rows.float(), view.float()):
        got = pos_conv1d(x, weight.to(x.dtype), bias.to(x.dtype), pos, left)
        assert got.is_contiguous() and (got.double() - expected).abs().max() <= (1e-12 if x.dtype == torch.float64 else 1e-5)


def test_pos_conv1d_with_few_tokens_and_dense_runs():
    x = torch.randn(2, 3, 2)
    weight = torch.randn(3, 1, 7)
    pos = torch.tensor([[0, 1], [4, 9]])
    torch.testing.assert_close(pos_conv1d(x, weight, None, pos, 3).double(), direct_pos_conv1d(x, weight, None, pos, 3))


@pytest.mark.parametrize("width,left", [(4, 3), (3, 1), (5, 2)])
def test_pos_conv1d_on_all_positions_is_the_dense_conv(width, left):
    batch, channels, length = 2, 6, 13
    x = torch.randn(batch, channels, length)
    weight = torch.randn(channels, 1, width)
    bias = torch.randn(channels)
    pos = torch.arange(length).expand(batch, length).contiguous()
    start = width - 1 - left
    dense = F.conv1d(x, weight, bias, padding=width - 1, groups=channels)[..., start : start + length]
    torch.testing.assert_close(pos_conv1d(x, weight, bias, pos, left), dense)


def test_pos_conv1d_causal_matches_mamba_conv():
    x = torch.randn(2, 4, 11)
    weight, bias = torch.randn(4, 1, 4), torch.randn(4)
    pos = torch.arange(11).repeat(2, 1)
    mamba = F.conv1d(x, weight, bias, padding=3, groups=4)[..., :11]
    torch.testing.assert_close(pos_conv1d(x, weight, bias, pos, 3), mamba)


@pytest.mark.parametrize("padding", [1, 2, 5])  # 5: 121 taps, more than the kernel sums in one register pass
def test_pos_conv2d_matches_definition(padding):
    batch, channels, height, width, kept = 2, 3, 5, 6, 17
    size = 2 * padding + 1
    x = torch.randn(batch, kept, channels)
    weight, bias = torch.randn(channels, 1, size, size), torch.randn(channels)
    pos = random_positions(batch, kept, height * width, seed=1)
    expected = direct_pos_conv2d(x, weight, bias, pos, height, width, padding)
    got = pos_conv2d(x, weight, bias, pos, height, width, padding)
    assert got.shape == x.shape and got.is_contiguous()
    assert (got.double() - expected).abs().max() <= 1e-5


def test_pos_conv2d_on_all_positions_is_the_dense_conv():
    batch, channels, height, width = 2, 4, 5, 7
    grid = torch.randn(batch, channels, height, width)
    weight, bias = torch.randn(channels, 1, 7, 7), torch.randn(channels)
    dense = F.conv2d(grid, weight, bias, padding=3, groups=channels)
    tokens = grid.flatten(2).transpose(1, 2)  # (batch, H*W, C)
    pos = torch.arange(height * width).repeat(batch, 1)
    got = pos_conv2d(tokens, weight, bias, pos, height, width, 3)
    torch.testing.assert_close(got, dense.flatten(2).transpose(1, 2))


def _zigzag(height, width):
    rows = [torch.arange(r * width, (r + 1) * width) for r in range(height)]
    return torch.cat([row if r % 2 == 0 else row.flip(0) for r, row in enumerate(rows)])


@pytest.mark.parametrize("path_name", ["identity", "flip", "zigzag"])
def test_path_order_lists_kept_positions_in_path_order(path_name):
    height, width = 4, 5
    length = height * width
    path = {"identity": torch.arange(length), "flip": torch.arange(length).flip(0),
            "zigzag": _zigzag(height, width)}[path_name]
    pos = random_positions(3, 11, length, seed=2)
    order = path_order(path, pos)
    assert order.dtype == torch.int64 and order.shape == pos.shape
    visit_index = {int(p): i for i, p in enumerate(path)}
    for b in range(pos.shape[0]):
        expected = sorted(pos[b].tolist(), key=visit_index.__getitem__)
        assert pos[b].gather(0, order[b]).tolist() == expected
    if path_name == "flip":
        assert torch.equal(order, torch.arange(10, -1, -1).repeat(3, 1))


def test_scatter_and_gather_tokens_round_trip_on_any_axis():
    pos = random_positions(2, 4, 9)
    x = torch.randn(2, 3, 4, 5)  # tokens on axis 2
    full = scatter_tokens(x, pos, 9, dim=2)
    assert full.shape == (2, 3, 9, 5)
    for b in range(2):
        kept = set(pos[b].tolist())
        for p in range(9):
            if p not in kept:
                assert torch.all(full[b, :, p] == 0)
    torch.testing.assert_close(gather_tokens(full, pos, dim=-2), x)
    x_last = torch.randn(2, 4, 3)  # tokens on axis 1 (B, L, D)
    torch.testing.assert_close(gather_tokens(scatter_tokens(x_last, pos, 9, dim=1), pos, dim=1), x_last)


def test_gradcheck_pos_conv1d():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pos = random_positions(2, 6, 10)
    assert torch.autograd.gradcheck(lambda a, w, c: pos_conv1d(a, w, c, pos, 2), (x, weight, bias))


def test_gradcheck_pos_conv2d():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pos = random_positions(2, 7, 12)
    assert torch.autograd.gradcheck(lambda a, w, c: pos_conv2d(a, w, c, pos, 3, 4, 1), (x, weight, bias))


def test_flop_counter_counts_twice_the_documented_macs():
    batch, channels, kept, width = 2, 5, 9, 4
    with FlopCounterMode(display=False) as counter:
        pos_conv1d(torch.randn(batch, channels, kept), torch.randn(channels, 1, width), None,
                   random_positions(batch, kept, 20), 3)
    assert counter.get_total_flops() == 2 * batch * channels * kept * width
    height, grid_width = 5, 6
    with FlopCounterMode(display=False) as counter:
        pos_conv2d(torch.randn(batch, kept, channels), torch.randn(channels, 1, 3, 3), torch.randn(channels),
                   random_positions(batch, kept, 30), height, grid_width, 1)
    assert counter.get_total_flops() == 2 * batch * channels * height * grid_width * 9
    with FlopCounterMode(display=False) as counter:
        path_order(torch.arange(20).flip(0), random_positions(batch, kept, 20))
    assert counter.get_total_flops() == 0


class PositionAwareBlock(torch.nn.Module):
    def __init__(self, channels=4, height=3, width=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, 1, 3, 3))
        self.grid = (height, width)
        self.register_buffer("path", torch.arange(height * width).flip(0))

    def forward(self, x, pos):
        y = pos_conv2d(x, self.weight, None, pos, *self.grid, 1)
        order = path_order(self.path, pos)
        return gather_tokens(y, order, dim=1), scatter_tokens(y, pos, self.grid[0] * self.grid[1], dim=1)


def test_export_keeps_token_ops_as_single_nodes():
    model = PositionAwareBlock()
    inputs = (torch.randn(2, 5, 4), random_positions(2, 5, 12))
    batch = torch.export.Dim("batch", min=2, max=32)
    exported = torch.export.export(model, inputs, dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.mambaprune.pos_conv2d.default) == 1
    assert targets.count(torch.ops.mambaprune.path_order.default) == 1
    other = (torch.randn(4, 5, 4), random_positions(4, 5, 12, seed=3))
    for got, expected in zip(exported.module()(*other), model(*other)):
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- validation


def test_pos_validation_names_argument_and_shape():
    x, weight = torch.randn(2, 3, 6), torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="pos_conv1d: pos must be an int64 tensor; got dtype torch.int32"):
        pos_conv1d(x, weight, None, torch.arange(6, dtype=torch.int32).repeat(2, 1), 3)
    with pytest.raises(ValueError, match=r"pos_conv1d: pos must have shape \(batch, K\) = \(2, 6\); got \(2, 5\)"):
        pos_conv1d(x, weight, None, torch.arange(5).repeat(2, 1), 3)
    with pytest.raises(ValueError, match=r"pos_conv1d: pos must have shape \(batch, K\) = \(2, 6\); got \(6,\)"):
        pos_conv1d(x, weight, None, torch.arange(6), 3)
    with pytest.raises(ValueError, match=r"pos_conv2d: pos must have shape \(batch, K\) = \(2, 6\); got \(2, 7\)"):
        pos_conv2d(x.transpose(1, 2), torch.randn(3, 1, 3, 3), None, torch.arange(7).repeat(2, 1), 3, 4, 1)


def test_conv_argument_validation():
    pos = torch.arange(6).repeat(2, 1)
    with pytest.raises(ValueError, match=r"pos_conv1d: x must have shape \(batch, C, K\) \(3 dims\)"):
        pos_conv1d(torch.randn(2, 6), torch.randn(3, 1, 4), None, pos, 3)
    with pytest.raises(ValueError, match=r"pos_conv1d: weight must have shape \(C, 1, W\) with C=3"):
        pos_conv1d(torch.randn(2, 3, 6), torch.randn(3, 2, 4), None, pos, 3)
    with pytest.raises(ValueError, match=r"pos_conv1d: left must be an int in \[0, W\) = \[0, 4\); got 4"):
        pos_conv1d(torch.randn(2, 3, 6), torch.randn(3, 1, 4), None, pos, 4)
    with pytest.raises(ValueError, match="pos_conv1d: x must be a floating-point tensor"):
        pos_conv1d(torch.ones(2, 3, 6, dtype=torch.int64), torch.randn(3, 1, 4), None, pos, 3)
    with pytest.raises(ValueError, match=r"pos_conv1d: all tensors must be on the device of x \(cpu\); pos is on meta"):
        pos_conv1d(torch.randn(2, 3, 6), torch.randn(3, 1, 4), None, pos.to("meta"), 3)
    with pytest.raises(ValueError, match=r"pos_conv2d: padding=0 with a \(3, 3\) kernel must keep"):
        pos_conv2d(torch.randn(2, 6, 3), torch.randn(3, 1, 3, 3), None, pos, 3, 4, 0)
    with pytest.raises(ValueError, match=r"pos_conv2d: bias must have shape \(C,\) = \(3,\); got \(4,\)"):
        pos_conv2d(torch.randn(2, 6, 3), torch.randn(3, 1, 3, 3), torch.randn(4), pos, 3, 4, 1)


def test_index_validation():
    with pytest.raises(ValueError, match=r"path_order: pos must have shape \(batch, K\) with K <= L=5"):
        path_order(torch.arange(5), torch.arange(6).repeat(2, 1))
    with pytest.raises(ValueError, match="path_order: path must be an int64 tensor"):
        path_order(torch.arange(5.0), torch.arange(3).repeat(2, 1))
    with pytest.raises(ValueError, match=r"gather_tokens: index must have shape \(batch, K\) with batch=2; got \(3, 2\)"):
        gather_tokens(torch.randn(2, 5, 4), torch.zeros(3, 2, dtype=torch.int64), dim=1)
    with pytest.raises(ValueError, match="gather_tokens: dim must name a non-batch axis"):
        gather_tokens(torch.randn(2, 5, 4), torch.zeros(2, 2, dtype=torch.int64), dim=0)
    with pytest.raises(ValueError, match=r"scatter_tokens: index must have shape \(batch, K\) = \(2, 5\); got \(2, 2\)"):
        scatter_tokens(torch.randn(2, 5, 4), torch.zeros(2, 2, dtype=torch.int64), 9, dim=1)


def test_opcheck_token_ops():
    pos = random_positions(2, 5, 12)
    x1 = torch.randn(2, 3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.mambaprune.pos_conv1d.default, (x1, torch.randn(3, 1, 4), torch.randn(3), pos, 3))
    x2 = torch.randn(2, 5, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.mambaprune.pos_conv2d.default, (x2, torch.randn(3, 1, 3, 3), None, pos, 3, 4, 1))
    torch.library.opcheck(torch.ops.mambaprune.path_order.default, (torch.arange(12).flip(0), pos))


# ----------------------------------------------------------------------------- C++ kernels vs composites


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out))


@pytest.mark.parametrize("with_bias", [True, False])
def test_pos_conv1d_matches_its_composite_at_vim_shapes_forward_and_backward(with_bias):
    from mambaprune.runtime.token_ops import pos_conv1d_composite

    x = torch.randn(3, 99, 40).transpose(1, 2)  # a (batch, K, C) tensor's view, as ViM passes it
    weight, bias = torch.randn(40, 1, 4), torch.randn(40) if with_bias else None
    pos = random_positions(3, 99, 197, seed=4)
    grad_out = torch.randn(3, 40, 99)
    ours = _grads(lambda a, w, c: pos_conv1d(a, w, c, pos, 3), (x, weight, bias), grad_out)
    theirs = _grads(lambda a, w, c: pos_conv1d_composite(a, w, c, pos, 3), (x, weight, bias), grad_out)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pos_conv2d_matches_its_composite_with_unsorted_positions_forward_and_backward():
    from mambaprune.runtime.token_ops import pos_conv2d_composite

    pos = torch.stack([torch.randperm(14 * 14)[:125] for _ in range(2)])  # any order of distinct cells
    x, weight, bias = torch.randn(2, 125, 40), torch.randn(40, 1, 7, 7), torch.randn(40)
    grad_out = torch.randn(2, 125, 40)
    ours = _grads(lambda a, w, c: pos_conv2d(a, w, c, pos, 14, 14, 3), (x, weight, bias), grad_out)
    theirs = _grads(lambda a, w, c: pos_conv2d_composite(a, w, c, pos, 14, 14, 3), (x, weight, bias), grad_out)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_convs_keep_their_dtype(dtype):
    pos = random_positions(2, 6, 12)
    x1, w1 = torch.randn(2, 3, 6, dtype=dtype), torch.randn(3, 1, 4, dtype=dtype)
    expected = direct_pos_conv1d(x1, w1, None, pos, 3)
    got = pos_conv1d(x1, w1, None, pos, 3)
    assert got.dtype == dtype and (got.double() - expected).abs().max() <= 0.1
    x2, w2 = torch.randn(2, 6, 3, dtype=dtype), torch.randn(3, 1, 3, 3, dtype=dtype)
    got2 = pos_conv2d(x2, w2, None, pos, 3, 4, 1)
    assert got2.dtype == dtype and (got2.double() - direct_pos_conv2d(x2, w2, None, pos, 3, 4, 1)).abs().max() <= 0.1


def test_the_convs_run_the_cpp_kernels_when_they_are_built():
    from mambaprune.runtime import cpu_kernels_status

    if not cpu_kernels_status().available:
        pytest.skip(f"the C++ CPU kernels are unavailable here: {cpu_kernels_status().detail}")
    pos = random_positions(2, 6, 12)
    x1 = torch.randn(2, 3, 6, requires_grad=True)
    x2 = torch.randn(2, 6, 3, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pos_conv1d(x1, torch.randn(3, 1, 4), None, pos, 3).sum().backward()
        pos_conv2d(x2, torch.randn(3, 1, 3, 3), torch.randn(3), pos, 3, 4, 1).sum().backward()
    ran = {e.name for e in prof.events() if e.name.startswith("mambaprune_cpu::")}
    assert ran == {f"mambaprune_cpu::pos_conv{n}d_{step}" for n in (1, 2) for step in ("forward", "backward")}
