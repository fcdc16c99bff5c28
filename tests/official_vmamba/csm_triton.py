"""csm_triton: VMamba's cross-scan and cross-merge (see the package docstring).

cross-scan: (B, C, H, W) | (B, H, W, C) -> (B, 4, C, L) | (B, L, 4, C), directions row-major,
column-major, both reversed (scans=0), or 4 copies (1), or 2 copies and their flips (2); with
one_by_one the input already holds one map per direction. cross-merge is its adjoint. The torch
path fills an allocated tensor by slice assignment, inside the autograd Functions CrossScanF /
CrossMergeF; on CUDA with triton, CrossScanTritonF / CrossMergeTritonF run a Triton kernel instead
(not reproduced: they refuse to run without a GPU). Both are called under torch.cuda.device.
"""
import torch


def _grid(x: torch.Tensor, channel_first: bool):
    """(batch, channels, height, width) of a map in either layout."""
    if channel_first:
        return tuple(x.shape)
    batch, height, width, channels = x.shape
    return batch, channels, height, width


def _directions(channel_first: bool):
    """Indexing of one direction k (an int or a slice) and the token axis of a (B, 4, C, L) | (B, L, 4, C)."""
    if channel_first:
        return (lambda k: (slice(None), k)), -1, 1
    return (lambda k: (slice(None), slice(None), k)), 1, 2


def _to_layout(t: torch.Tensor, have_channel_first: bool, want_channel_first: bool, to_first, to_last):
    if have_channel_first and not want_channel_first:
        return t.permute(*to_last).contiguous()
    if want_channel_first and not have_channel_first:
        return t.permute(*to_first).contiguous()
    return t


def cross_scan_fwd(x: torch.Tensor, in_channel_first=True, out_channel_first=True, scans=0):
    """Fill an allocated (B, 4, C, L) | (B, L, 4, C) by slice assignment, as the official torch path does."""
    batch, channels, height, width = _grid(x, in_channel_first)
    tokens = height * width
    direction, token_axis, k_axis = _directions(in_channel_first)
    one = (batch, 1, channels, tokens) if in_channel_first else (batch, tokens, 1, channels)
    copies = (lambda k: (1, k, 1, 1)) if in_channel_first else (lambda k: (1, 1, k, 1))
    if scans == 0:
        rows = x.flatten(2, 3) if in_channel_first else x.flatten(1, 2)
        cols = (x.transpose(dim0=2, dim1=3).flatten(2, 3) if in_channel_first
                else x.transpose(dim0=1, dim1=2).flatten(1, 2))
        shape = (batch, 4, channels, tokens) if in_channel_first else (batch, tokens, 4, channels)
        out = x.new_empty(shape)
        out[direction(0)] = rows
        out[direction(1)] = cols
        out[direction(slice(2, 4))] = torch.flip(out[direction(slice(0, 2))], dims=[token_axis])
    elif scans == 1:
        out = x.view(*one).repeat(*copies(4))
    else:
        out = x.view(*one).repeat(*copies(2))
        out = torch.cat([out, out.flip(dims=[token_axis])], dim=k_axis)
    return _to_layout(out, in_channel_first, out_channel_first, to_first=(0, 2, 3, 1), to_last=(0, 3, 1, 2))


def cross_merge_fwd(y: torch.Tensor, in_channel_first=True, out_channel_first=True, scans=0):
    """(B, 4, C, H, W) | (B, H, W, 4, C) -> (B, C, L) | (B, L, C): every direction back in row-major order, summed."""
    if out_channel_first:
        batch, groups, channels, height, width = y.shape
        seq = y.view(batch, groups, channels, -1)
        token_axis, k_axis = -1, 1
    else:
        batch, height, width, groups, channels = y.shape
        seq = y.view(batch, -1, groups, channels)
        token_axis, k_axis = 1, 2
    pick = (lambda t, k: t[:, k]) if out_channel_first else (lambda t, k: t[:, :, k])
    halves = (batch, 2, channels, -1) if out_channel_first else (batch, -1, 2, channels)
    if scans == 0:
        both = pick(seq, slice(0, 2)) + pick(seq, slice(2, 4)).flip(dims=[token_axis]).view(*halves)
        if out_channel_first:
            col_major = pick(both, 1).view(batch, -1, width, height).transpose(dim0=2, dim1=3)
            merged = pick(both, 0) + col_major.contiguous().view(batch, channels, -1)
        else:
            col_major = pick(both, 1).view(batch, width, height, -1).transpose(dim0=1, dim1=2)
            merged = pick(both, 0) + col_major.contiguous().view(batch, -1, channels)
    elif scans == 1:
        merged = seq.sum(k_axis)
    else:
        both = pick(seq, slice(0, 2)) + pick(seq, slice(2, 4)).flip(dims=[token_axis]).view(*halves)
        merged = both.sum(k_axis)
    if in_channel_first != out_channel_first:
        merged = merged.permute(0, 2, 1).contiguous()
    return merged


def cross_scan1b1_fwd(x: torch.Tensor, in_channel_first=True, out_channel_first=True, scans=0):
    """x holds one map per direction: (B, 4, C, H, W) | (B, H, W, 4, C)."""
    if in_channel_first:
        parts = [x[:, k] for k in range(4)]
        row = lambda m: m.flatten(2, 3)                                  # noqa: E731
        col = lambda m: m.transpose(dim0=2, dim1=3).flatten(2, 3)        # noqa: E731
        token_dim, stack_dim = -1, 1
    else:
        parts = [x[:, :, :, k] for k in range(4)]
        row = lambda m: m.flatten(1, 2)                                  # noqa: E731
        col = lambda m: m.transpose(dim0=1, dim1=2).flatten(1, 2)        # noqa: E731
        token_dim, stack_dim = 1, 2
    if scans == 1:
        return x.flatten(2, 3) if in_channel_first else x.flatten(1, 2)
    second = col if scans == 0 else row
    y = torch.stack([row(parts[0]), second(parts[1]), torch.flip(row(parts[2]), dims=[token_dim]),
                     torch.flip(second(parts[3]), dims=[token_dim])], dim=stack_dim)
    if in_channel_first and not out_channel_first:
        y = y.permute(0, 3, 1, 2).contiguous()
    elif not in_channel_first and out_channel_first:
        y = y.permute(0, 2, 3, 1).contiguous()
    return y


def cross_merge1b1_fwd(y: torch.Tensor, in_channel_first=True, out_channel_first=True, scans=0):
    """(B, 4, C, H, W) | (B, H, W, 4, C) -> each direction back in row-major order, not summed."""
    if out_channel_first:
        B, K, D, H, W = y.shape
        y = y.view(B, K, D, -1)
        back = lambda m: m.view(B, -1, W, H).transpose(dim0=2, dim1=3).flatten(2, 3)  # noqa: E731
        parts, token_dim, stack_dim = [y[:, k] for k in range(4)], -1, 1
    else:
        B, H, W, K, D = y.shape
        y = y.view(B, -1, K, D)
        back = lambda m: m.view(B, W, H, -1).transpose(dim0=1, dim1=2).flatten(1, 2)  # noqa: E731
        parts, token_dim, stack_dim = [y[:, :, k] for k in range(4)], 1, 2
    if scans == 1:
        return y
    second = back if scans == 0 else (lambda m: m)
    y = torch.stack([parts[0], second(parts[1]), torch.flip(parts[2], dims=[token_dim]),
                     torch.flip(second(parts[3]), dims=[token_dim])], dim=stack_dim)
    if out_channel_first and not in_channel_first:
        y = y.permute(0, 3, 1, 2).contiguous()
    elif not out_channel_first and in_channel_first:
        y = y.permute(0, 2, 3, 1).contiguous()
    return y


class CrossScanF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0):
        ctx.options = (in_channel_first, out_channel_first, one_by_one, scans)
        ctx.shape = x.shape
        fn = cross_scan1b1_fwd if one_by_one else cross_scan_fwd
        return fn(x, in_channel_first, out_channel_first, scans)

    @staticmethod
    def backward(ctx, ys):
        in_channel_first, out_channel_first, one_by_one, scans = ctx.options
        shape = ctx.shape
        H, W = (shape[-2:] if in_channel_first else shape[1:3])
        B = shape[0]
        grid = ys.view(B, 4, -1, H, W) if out_channel_first else ys.view(B, H, W, 4, -1)
        fn = cross_merge1b1_fwd if one_by_one else cross_merge_fwd
        return fn(grid, in_channel_first, out_channel_first, scans).reshape(shape), None, None, None, None


class CrossMergeF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0):
        ctx.options = (in_channel_first, out_channel_first, one_by_one, scans)
        ctx.shape = ys.shape
        fn = cross_merge1b1_fwd if one_by_one else cross_merge_fwd
        return fn(ys, in_channel_first, out_channel_first, scans)

    @staticmethod
    def backward(ctx, x):
        in_channel_first, out_channel_first, one_by_one, scans = ctx.options
        shape = ctx.shape
        B = shape[0]
        H, W = (shape[-2:] if out_channel_first else shape[1:3])
        if one_by_one:
            x = x.view(B, 4, -1, H, W) if in_channel_first else x.view(B, H, W, 4, -1)
        else:
            x = x.view(B, -1, H, W) if in_channel_first else x.view(B, H, W, -1)
        fn = cross_scan1b1_fwd if one_by_one else cross_scan_fwd
        return fn(x, in_channel_first, out_channel_first, scans).reshape(shape), None, None, None, None


def _triton_kernel(*tensors):
    raise RuntimeError("the Triton cross-scan kernel needs a CUDA device")


class CrossScanTritonF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0):
        B, C, H, W = (x.shape[0], x.shape[-3], x.shape[-2], x.shape[-1]) if in_channel_first else \
            (x.shape[0], x.shape[-1], x.shape[1], x.shape[2])
        y = x.new_empty((B, 4, C, H * W)) if out_channel_first else x.new_empty((B, H * W, 4, C))
        _triton_kernel(x.contiguous(), y)
        return y


class CrossMergeTritonF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0):
        B, C, H, W = (y.shape[0], y.shape[2], y.shape[3], y.shape[4]) if out_channel_first else \
            (y.shape[0], y.shape[4], y.shape[1], y.shape[2])
        x = y.new_empty((B, C, H * W)) if in_channel_first else y.new_empty((B, H * W, C))
        _triton_kernel(x, y.contiguous())
        return x


WITH_TRITON = False        # the official module sets it from `import triton`; no kernel here either way


def _function_for(t: torch.Tensor, on_torch, on_triton, force_torch: bool):
    return on_triton if (WITH_TRITON and t.is_cuda and not force_torch) else on_torch


def cross_scan_fn(x: torch.Tensor, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0,
                  force_torch=False):
    """x (B, C, H, W) | (B, H, W, C) | (B, 4, C, H, W) | (B, H, W, 4, C) -> (B, 4, C, L) | (B, L, 4, C)."""
    function = _function_for(x, CrossScanF, CrossScanTritonF, force_torch)
    with torch.cuda.device(x.device):        # the official wrapper: raises for a CPU tensor
        return function.apply(x, in_channel_first, out_channel_first, one_by_one, scans)


def cross_merge_fn(y: torch.Tensor, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0,
                   force_torch=False):
    """y (B, 4, C, H, W) | (B, H, W, 4, C) -> (B, C, L) | (B, L, C) (one_by_one: the 4 maps kept apart)."""
    function = _function_for(y, CrossMergeF, CrossMergeTritonF, force_torch)
    with torch.cuda.device(y.device):
        return function.apply(y, in_channel_first, out_channel_first, one_by_one, scans)
