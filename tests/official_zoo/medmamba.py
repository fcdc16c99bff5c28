"""MedMamba (Yue & Li 2024; YubiaoYue/MedMamba `MedMamba.py`), reproduced for tests.

Our own code, in their style and with their names: `VSSM` of `VSSLayer`s whose blocks `SS_Conv_SSM`
split the channels in two: one half through LayerNorm and VMamba's first `SS2D` (`forward_corev0`:
the 4-way cross-scan built by `torch.stack` / `torch.cat` / `torch.flip`, einsum projections, one grouped
`selective_scan_fn` of mamba_ssm, the directions merged back and summed, out_norm, gate), the other
half through a 3x3 / 3x3 / 1x1 conv stack; concatenated, `channel_shuffle`d, plus the input.
`PatchMerging2D` (four strided slices) between stages, an average pool and a linear head.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

PAPER = "MedMamba: Vision Mamba for Medical Image Classification (arXiv 2403.03849)"
REPO = "YubiaoYue/MedMamba"
# tiny(): every stage ends in a dense downsampling (PatchMerging2D), so pruning its sites removes 0.208 of the
# FLOPs at most; the checks run at 0.2
RATIO = 0.2


class PatchEmbed2D(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging2D(nn.Module):
    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x):
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class SS2D(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=3, expand=2, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dropout=0.0, conv_bias=True, bias=False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, groups=self.d_inner, bias=conv_bias, kernel_size=d_conv,
                                padding=(d_conv - 1) // 2)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.stack(
            [nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False).weight for _ in range(4)], dim=0))
        dt_projs = [self.dt_init(self.dt_rank, self.d_inner, dt_min, dt_max, dt_init_floor) for _ in range(4)]
        self.dt_projs_weight = nn.Parameter(torch.stack([t.weight for t in dt_projs], dim=0))
        self.dt_projs_bias = nn.Parameter(torch.stack([t.bias for t in dt_projs], dim=0))
        A_log = torch.log(repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner))
        self.A_logs = nn.Parameter(repeat(A_log, "d n -> r d n", r=4).flatten(0, 1))
        self.Ds = nn.Parameter(torch.ones(4 * self.d_inner))
        self.forward_core = self.forward_corev0
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

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

    def forward_corev0(self, x):
        self.selective_scan = selective_scan_fn
        B, C, H, W = x.shape
        L, K = H * W, 4
        x_hwwh = torch.stack([x.view(B, -1, L), torch.transpose(x, dim0=2, dim1=3).contiguous().view(B, -1, L)],
                             dim=1).view(B, 2, -1, L)
        xs = torch.cat([x_hwwh, torch.flip(x_hwwh, dims=[-1])], dim=1)
        x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs.view(B, K, -1, L), self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("b k r l, k d r -> b k d l", dts.view(B, K, -1, L), self.dt_projs_weight)
        xs = xs.float().view(B, -1, L)
        dts = dts.contiguous().float().view(B, -1, L)
        Bs, Cs = Bs.float().view(B, K, -1, L), Cs.float().view(B, K, -1, L)
        Ds = self.Ds.float().view(-1)
        As = -torch.exp(self.A_logs.float()).view(-1, self.d_state)
        dt_projs_bias = self.dt_projs_bias.float().view(-1)
        out_y = self.selective_scan(xs, dts, As, Bs, Cs, Ds, z=None, delta_bias=dt_projs_bias, delta_softplus=True,
                                    return_last_state=False).view(B, K, -1, L)
        inv_y = torch.flip(out_y[:, 2:4], dims=[-1]).view(B, 2, -1, L)
        wh_y = torch.transpose(out_y[:, 1].view(B, -1, W, H), dim0=2, dim1=3).contiguous().view(B, -1, L)
        invwh_y = torch.transpose(inv_y[:, 1].view(B, -1, W, H), dim0=2, dim1=3).contiguous().view(B, -1, L)
        return out_y[:, 0], inv_y[:, 0], wh_y, invwh_y

    def forward(self, x, **kwargs):
        B, H, W, C = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y1, y2, y3, y4 = self.forward_core(x)
        y = torch.transpose(y1 + y2 + y3 + y4, dim0=1, dim1=2).contiguous().view(B, H, W, -1)
        out = self.out_proj(self.out_norm(y) * F.silu(z))
        return self.dropout(out) if self.dropout is not None else out


def channel_shuffle(x, groups):
    batch_size, height, width, num_channels = x.size()
    x = x.view(batch_size, height, width, groups, num_channels // groups)
    return torch.transpose(x, 3, 4).contiguous().view(batch_size, height, width, -1)


class SS_Conv_SSM(nn.Module):
    def __init__(self, hidden_dim=0, norm_layer=partial(nn.LayerNorm, eps=1e-6), d_state=16):
        super().__init__()
        half = hidden_dim // 2
        self.ln_1 = norm_layer(half)
        self.self_attention = SS2D(d_model=half, d_state=d_state)
        self.drop_path = nn.Identity()
        self.conv33conv33conv11 = nn.Sequential(
            nn.BatchNorm2d(half), nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.ReLU(), nn.Conv2d(half, half, 1, 1), nn.ReLU())

    def forward(self, input):
        input_left, input_right = input.chunk(2, dim=-1)
        x = self.drop_path(self.self_attention(self.ln_1(input_right)))
        input_left = self.conv33conv33conv11(input_left.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        output = channel_shuffle(torch.cat((input_left.contiguous(), x), dim=-1), groups=2)
        return output + input


class VSSLayer(nn.Module):
    def __init__(self, dim, depth, norm_layer=nn.LayerNorm, downsample=None, d_state=16):
        super().__init__()
        self.blocks = nn.ModuleList(SS_Conv_SSM(hidden_dim=dim, norm_layer=norm_layer, d_state=d_state)
                                    for _ in range(depth))
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class VSSM(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, num_classes=1000, depths=(2, 2, 4, 2), dims=(96, 192, 384, 768),
                 d_state=16, norm_layer=nn.LayerNorm, img_size=224):
        super().__init__()
        self.img_size = img_size
        self.num_layers = len(depths)
        self.patch_embed = PatchEmbed2D(patch_size, in_chans, dims[0], norm_layer)
        self.pos_drop = nn.Dropout(p=0.0)
        self.layers = nn.ModuleList(
            VSSLayer(dims[i], depths[i], norm_layer, PatchMerging2D if i < self.num_layers - 1 else None, d_state)
            for i in range(self.num_layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_backbone(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x):
        x = self.forward_backbone(x).permute(0, 3, 1, 2)
        return self.head(torch.flatten(self.avgpool(x), start_dim=1))


def tiny(**overrides):
    """MedMamba-T's structure at 32 px: stages of 8x8, 4x4 and 2x2 cells."""
    config = dict(patch_size=4, depths=(2, 2, 2), dims=(16, 32, 64), d_state=4, num_classes=10, img_size=32)
    return VSSM(**{**config, **overrides})
