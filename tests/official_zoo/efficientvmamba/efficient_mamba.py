"""EfficientVMamba's efficient_mamba: the scan Function, cross_selective_scan, ES2D, the VSS stages."""
import math

import selective_scan_cuda_core
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat

from .efficient_scan import EfficientMerge, EfficientScan


class SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, nrows=1):
        if B.dim() == 3:
            B = B.unsqueeze(dim=1)
        if C.dim() == 3:
            C = C.unsqueeze(dim=1)
        out, x, *rest = selective_scan_cuda_core.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows)
        return out


def cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds, out_norm,
                         nrows=-1, delta_softplus=True, to_dtype=True, step_size=2):
    B, D, H, W = x.shape
    D, N = A_logs.shape
    K, D, R = dt_projs_weight.shape
    nrows = 4 if D % 4 == 0 else 1
    ori_h, ori_w = H, W
    xs = EfficientScan.apply(x, step_size)
    H, W = math.ceil(H / step_size), math.ceil(W / step_size)
    L = H * W
    x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("b k r l, k d r -> b k d l", dts, dt_projs_weight)
    xs = xs.view(B, -1, L).to(torch.float)
    dts = dts.contiguous().view(B, -1, L).to(torch.float)
    As = -torch.exp(A_logs.to(torch.float))
    Bs, Cs = Bs.contiguous().to(torch.float), Cs.contiguous().to(torch.float)
    Ds = Ds.to(torch.float)
    delta_bias = dt_projs_bias.view(-1).to(torch.float)

    def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, nrows=1):
        return SelectiveScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows)

    ys = selective_scan(xs, dts, As, Bs, Cs, Ds, delta_bias, delta_softplus, nrows).view(B, K, -1, L)
    ori_h, ori_w = int(ori_h), int(ori_w)
    y = EfficientMerge.apply(ys, ori_h, ori_w, step_size)
    y = y.transpose(dim0=1, dim1=2).contiguous()
    y = out_norm(y).view(B, ori_h, ori_w, -1)
    return y.to(x.dtype) if to_dtype else y


class PatchMerging2D(nn.Module):
    def __init__(self, dim, out_dim=-1, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, (2 * dim) if out_dim < 0 else out_dim, bias=False)
        self.norm = norm_layer(4 * dim)

    @staticmethod
    def _patch_merging_pad(x):
        x0, x1 = x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :]
        x2, x3 = x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]
        return torch.cat([x0, x1, x2, x3], -1)

    def forward(self, x):
        return self.reduction(self.norm(self._patch_merging_pad(x)))


class SS2D(nn.Module):
    """ES2D: forward type v2 with step_size 2 (the atrous scan)."""

    def __init__(self, d_model=96, d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3, conv_bias=True, bias=False,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, step_size=2):
        super().__init__()
        d_expand = d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.d_state, self.d_conv, self.step_size = d_state, d_conv, step_size
        self.out_norm = nn.LayerNorm(d_inner)
        self.K = self.K2 = 4
        self.in_proj = nn.Linear(d_model, d_expand * 2, bias=bias)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d_expand, d_expand, groups=d_expand, bias=conv_bias, kernel_size=d_conv,
                                padding=(d_conv - 1) // 2)
        self.x_proj_weight = nn.Parameter(torch.stack([nn.Linear(d_inner, self.dt_rank + d_state * 2, bias=False).weight
                                                       for _ in range(self.K)], dim=0))
        dt_projs = [self.dt_init(self.dt_rank, d_inner, dt_min, dt_max, dt_init_floor) for _ in range(self.K)]
        self.dt_projs_weight = nn.Parameter(torch.stack([t.weight for t in dt_projs], dim=0))
        self.dt_projs_bias = nn.Parameter(torch.stack([t.bias for t in dt_projs], dim=0))
        A_log = torch.log(repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=d_inner))
        self.A_logs = nn.Parameter(repeat(A_log, "d n -> r d n", r=self.K2).flatten(0, 1))
        self.Ds = nn.Parameter(torch.ones(self.K2 * d_inner))
        self.out_proj = nn.Linear(d_expand, d_model, bias=bias)
        self.dropout = nn.Identity()

    @staticmethod
    def dt_init(dt_rank, d_inner, dt_min, dt_max, dt_init_floor):
        dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            dt = dt.clamp(min=dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        return dt_proj

    def forward_corev2(self, x, nrows=-1):
        return cross_selective_scan(x, self.x_proj_weight, None, self.dt_projs_weight, self.dt_projs_bias,
                                    self.A_logs, self.Ds, getattr(self, "out_norm", None), nrows=nrows,
                                    delta_softplus=True, step_size=self.step_size)

    def forward(self, x, **kwargs):
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        z = self.act(z)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_corev2(x)
        return self.dropout(self.out_proj(y * z))


class VSSBlock(nn.Module):
    def __init__(self, hidden_dim, ssm_d_state=16, ssm_ratio=2.0, mlp_ratio=4.0, step_size=2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = SS2D(d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, step_size=step_size)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, int(hidden_dim * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(hidden_dim * mlp_ratio), hidden_dim))

    def forward(self, input):
        x = input + self.drop_path(self.op(self.norm(input)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VSSM(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, num_classes=1000, depths=(2, 2, 9, 2), dims=(48, 96, 192, 384),
                 ssm_d_state=16, ssm_ratio=2.0, mlp_ratio=4.0, img_size=224):
        super().__init__()
        self.img_size = img_size
        self.num_layers = len(depths)
        self.patch_embed = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
                                         _Permute(0, 2, 3, 1), nn.LayerNorm(dims[0]))
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            layer = nn.Module()
            layer.blocks = nn.Sequential(*[VSSBlock(dims[i], ssm_d_state, ssm_ratio, mlp_ratio) for _ in range(depths[i])])
            layer.downsample = PatchMerging2D(dims[i], dims[i + 1]) if i < self.num_layers - 1 else nn.Identity()
            self.layers.append(layer)
        self.classifier = nn.Sequential()
        self.classifier.add_module("norm", nn.LayerNorm(dims[-1]))
        self.classifier.add_module("head", nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer.downsample(layer.blocks(x))
        x = self.classifier.norm(x)
        return self.classifier.head(x.permute(0, 3, 1, 2).flatten(2).mean(-1))


class _Permute(nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.args = args

    def forward(self, x):
        return x.permute(*self.args)


def tiny(**overrides):
    """The VSS stages of EfficientVMamba-T at 32 px: 8x8, 4x4 grids (step_size 2 needs even sides)."""
    config = dict(patch_size=4, depths=(2, 2), dims=(16, 32), ssm_d_state=4, num_classes=10, img_size=32)
    return VSSM(**{**config, **overrides})
