"""GroupMamba's csms6s: one-direction cross-scans / merges and the scan's autograd Function."""
import selective_scan_cuda_core
import torch


class CrossScan_1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        B, C, H, W = x.shape
        xs = x.new_empty((B, 1, C, H * W))
        xs[:, 0] = x.flatten(2, 3)
        return xs


class CrossMerge_1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys):
        B, K, D, H, W = ys.shape
        return ys.view(B, K, D, -1)[:, 0]


class CrossScan_2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        B, C, H, W = x.shape
        xs = x.new_empty((B, 1, C, H * W))
        xs[:, 0] = x.transpose(dim0=2, dim1=3).flatten(2, 3)
        return xs


class CrossMerge_2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys):
        B, K, D, H, W = ys.shape
        ys = ys.view(B, K, D, -1)
        return ys[:, 0].view(B, -1, W, H).transpose(dim0=2, dim1=3).contiguous().view(B, D, -1)


class CrossScan_3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        B, C, H, W = x.shape
        xs = x.new_empty((B, 1, C, H * W))
        xs[:, 0] = torch.flip(x.flatten(2, 3), dims=[-1])
        return xs


class CrossMerge_3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys):
        B, K, D, H, W = ys.shape
        return ys.view(B, K, D, -1)[:, 0].flip(dims=[-1]).view(B, D, -1)


class CrossScan_4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        B, C, H, W = x.shape
        xs = x.new_empty((B, 1, C, H * W))
        xs[:, 0] = torch.flip(x.transpose(dim0=2, dim1=3).flatten(2, 3), dims=[-1])
        return xs


class CrossMerge_4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys):
        B, K, D, H, W = ys.shape
        ys = ys.view(B, K, D, -1)
        return ys[:, 0].view(B, -1, W, H).transpose(dim0=2, dim1=3).contiguous().view(B, D, -1).flip(dims=[-1])


class SelectiveScanCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, nrows=1, backnrows=1,
                oflex=True):
        ctx.delta_softplus = delta_softplus
        out, x, *rest = selective_scan_cuda_core.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, 1)
        return out
