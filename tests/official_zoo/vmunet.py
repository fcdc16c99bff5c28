"""VM-UNet (Ruan & Xiang 2024; JCruan519/VM-UNet `models/vmunet/vmamba.py`, `vmunet.py`), reproduced for tests.

Our own code, in their style and with their names: a U-shaped segmentation network, `VSSM` with an
encoder of `VSSLayer`s (`VSSBlock`: `ln_1`, VMamba's first `SS2D` as `self_attention`, residual;
`PatchMerging2D` by four strided slices between stages) and a decoder of `VSSLayer_up`s that expand
first (`PatchExpand2D`: a linear layer, then einops' `b h w (p1 p2 c) -> b (h p1) (w p2) c`), each fed
the previous decoder output plus the encoder's skip (the input of the matching encoder stage);
`Final_PatchExpand2D` (x4) and a 1x1 conv give per-pixel logits at the image's resolution. `VMUNet`
wraps it (a sigmoid for one class). SS2D is `forward_corev0`: the 4-way cross-scan by stack / cat /
flip, einsum projections, one grouped mamba_ssm `selective_scan_fn`, the directions merged back.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

PAPER = "VM-UNet: Vision Mamba UNet for Medical Image Segmentation (arXiv 2402.02491)"
REPO = "JCruan519/VM-UNet"
# tiny(): every encoder stage ends in a dense downsampling, every decoder stage in a dense upsampling, and
# the x4 expansion and 1x1 conv at full resolution stay dense: pruning removes 0.21 of the FLOPs at most
# with the default sites; the checks run at 0.2
RATIO = 0.2


class PatchEmbed2D(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x


class PatchMerging2D(nn.Module):
    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x):
        B, H, W, C = x.shape
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1)
        x = x.view(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class PatchExpand2D(nn.Module):
    def __init__(self, dim, dim_scale=2, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim * 2
        self.dim_scale = dim_scale
        self.expand = nn.Linear(self.dim, dim_scale * self.dim, bias=False)
        self.norm = norm_layer(self.dim // dim_scale)

    def forward(self, x):
        B, H, W, C = x.shape
        x = self.expand(x)
        x = rearrange(x, "b h w (p1 p2 c)-> b (h p1) (w p2) c", p1=self.dim_scale, p2=self.dim_scale,
                      c=C // self.dim_scale)
        return self.norm(x)


class Final_PatchExpand2D(nn.Module):
    def __init__(self, dim, dim_scale=4, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.dim_scale = dim_scale
        self.expand = nn.Linear(self.dim, dim_scale * self.dim, bias=False)
        self.norm = norm_layer(self.dim // dim_scale)

    def forward(self, x):
        B, H, W, C = x.shape
        x = self.expand(x)
        x = rearrange(x, "b h w (p1 p2 c)-> b (h p1) (w p2) c", p1=self.dim_scale, p2=self.dim_scale,
                      c=C // self.dim_scale)
        return self.norm(x)


class SS2D(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=3, expand=2, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dropout=0.0, conv_bias=True, bias=False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16)
        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, groups=self.d_inner, bias=conv_bias,
                                kernel_size=d_conv, padding=(d_conv - 1) // 2)
        self.act = nn.SiLU()
        x_proj = [nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False) for _ in range(4)]
        self.x_proj_weight = nn.Parameter(torch.stack([t.weight for t in x_proj], dim=0))
        dt_projs = [self.dt_init(self.dt_rank, self.d_inner, dt_min, dt_max, dt_init_floor) for _ in range(4)]
        self.dt_projs_weight = nn.Parameter(torch.stack([t.weight for t in dt_projs], dim=0))
        self.dt_projs_bias = nn.Parameter(torch.stack([t.bias for t in dt_projs], dim=0))
        self.A_logs = self.A_log_init(self.d_state, self.d_inner, copies=4)
        self.Ds = nn.Parameter(torch.ones(4 * self.d_inner))
        self.forward_core = self.forward_corev0
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

    @staticmethod
    def dt_init(dt_rank, d_inner, dt_min, dt_max, dt_init_floor):
        dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        dt_init_std = dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        return dt_proj

    @staticmethod
    def A_log_init(d_state, d_inner, copies=1):
        A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=d_inner).contiguous()
        A_log = torch.log(A)
        if copies > 1:
            A_log = repeat(A_log, "d n -> r d n", r=copies).flatten(0, 1)
        return nn.Parameter(A_log)

    def forward_corev0(self, x):
        self.selective_scan = selective_scan_fn
        B, C, H, W = x.shape
        L = H * W
        K = 4
        x_hwwh = torch.stack([x.view(B, -1, L), torch.transpose(x, dim0=2, dim1=3).contiguous().view(B, -1, L)],
                             dim=1).view(B, 2, -1, L)
        xs = torch.cat([x_hwwh, torch.flip(x_hwwh, dims=[-1])], dim=1)
        x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs.view(B, K, -1, L), self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("b k r l, k d r -> b k d l", dts.view(B, K, -1, L), self.dt_projs_weight)
        xs = xs.float().view(B, -1, L)
        dts = dts.contiguous().float().view(B, -1, L)
        Bs = Bs.float().view(B, K, -1, L)
        Cs = Cs.float().view(B, K, -1, L)
        Ds = self.Ds.float().view(-1)
        As = -torch.exp(self.A_logs.float()).view(-1, self.d_state)
        dt_projs_bias = self.dt_projs_bias.float().view(-1)
        out_y = self.selective_scan(xs, dts, As, Bs, Cs, Ds, z=None, delta_bias=dt_projs_bias,
                                    delta_softplus=True, return_last_state=False).view(B, K, -1, L)
        inv_y = torch.flip(out_y[:, 2:4], dims=[-1]).view(B, 2, -1, L)
        wh_y = torch.transpose(out_y[:, 1].view(B, -1, W, H), dim0=2, dim1=3).contiguous().view(B, -1, L)
        invwh_y = torch.transpose(inv_y[:, 1].view(B, -1, W, H), dim0=2, dim1=3).contiguous().view(B, -1, L)
        return out_y[:, 0], inv_y[:, 0], wh_y, invwh_y

    def forward(self, x, **kwargs):
        B, H, W, C = x.shape
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2).contiguous()
        x = self.act(self.conv2d(x))
        y1, y2, y3, y4 = self.forward_core(x)
        y = y1 + y2 + y3 + y4
        y = torch.transpose(y, dim0=1, dim1=2).contiguous().view(B, H, W, -1)
        y = self.out_norm(y)
        y = y * F.silu(z)
        out = self.out_proj(y)
        if self.dropout is not None:
            out = self.dropout(out)
        return out


class VSSBlock(nn.Module):
    def __init__(self, hidden_dim=0, norm_layer=partial(nn.LayerNorm, eps=1e-6), attn_drop_rate=0.0, d_state=16):
        super().__init__()
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = SS2D(d_model=hidden_dim, dropout=attn_drop_rate, d_state=d_state)
        self.drop_path = nn.Identity()

    def forward(self, input):
        return input + self.drop_path(self.self_attention(self.ln_1(input)))


class VSSLayer(nn.Module):
    def __init__(self, dim, depth, norm_layer=nn.LayerNorm, downsample=None, d_state=16):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList([VSSBlock(hidden_dim=dim, norm_layer=norm_layer, d_state=d_state)
                                     for _ in range(depth)])
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class VSSLayer_up(nn.Module):
    def __init__(self, dim, depth, norm_layer=nn.LayerNorm, upsample=None, d_state=16):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList([VSSBlock(hidden_dim=dim, norm_layer=norm_layer, d_state=d_state)
                                     for _ in range(depth)])
        self.upsample = upsample(dim=dim, norm_layer=norm_layer) if upsample is not None else None

    def forward(self, x):
        if self.upsample is not None:
            x = self.upsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class VSSM(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, num_classes=1000, depths=(2, 2, 9, 2), depths_decoder=(2, 9, 2, 2),
                 dims=(96, 192, 384, 768), dims_decoder=(768, 384, 192, 96), d_state=16, norm_layer=nn.LayerNorm,
                 patch_norm=True):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = dims[0]
        self.patch_embed = PatchEmbed2D(patch_size=patch_size, in_chans=in_chans, embed_dim=self.embed_dim,
                                        norm_layer=norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(p=0.0)
        self.layers = nn.ModuleList([
            VSSLayer(dim=dims[i], depth=depths[i], d_state=d_state, norm_layer=norm_layer,
                     downsample=PatchMerging2D if (i < self.num_layers - 1) else None)
            for i in range(self.num_layers)])
        self.layers_up = nn.ModuleList([
            VSSLayer_up(dim=dims_decoder[i], depth=depths_decoder[i], d_state=d_state, norm_layer=norm_layer,
                        upsample=PatchExpand2D if (i != 0) else None)
            for i in range(self.num_layers)])
        self.final_up = Final_PatchExpand2D(dim=dims_decoder[-1], dim_scale=4, norm_layer=norm_layer)
        self.final_conv = nn.Conv2d(dims_decoder[-1] // 4, num_classes, 1)

    def forward_features(self, x):
        skip_list = []
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            skip_list.append(x)
            x = layer(x)
        return x, skip_list

    def forward_features_up(self, x, skip_list):
        for inx, layer_up in enumerate(self.layers_up):
            if inx == 0:
                x = layer_up(x)
            else:
                x = layer_up(x + skip_list[-inx])
        return x

    def forward_final(self, x):
        x = self.final_up(x)
        x = x.permute(0, 3, 1, 2)
        return self.final_conv(x)

    def forward(self, x):
        x, skip_list = self.forward_features(x)
        x = self.forward_features_up(x, skip_list)
        return self.forward_final(x)


class VMUNet(nn.Module):
    def __init__(self, input_channels=3, num_classes=1, depths=(2, 2, 9, 2), depths_decoder=(2, 9, 2, 2), **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.vmunet = VSSM(in_chans=input_channels, num_classes=num_classes, depths=depths,
                           depths_decoder=depths_decoder, **kwargs)

    def forward(self, x):
        if x.size()[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        logits = self.vmunet(x)
        if self.num_classes == 1:
            return torch.sigmoid(logits)
        return logits


def tiny(**overrides):
    """VM-UNet's structure at 32 px: encoder stages of 8x8, 4x4 and 2x2 cells, the decoder back up to 8x8,
    per-pixel logits of 4 classes at 32x32. (Widths 32-128: at 16-64 the final LayerNorm over 16 // 4 = 4
    channels magnifies the fp32 rounding of two scan implementations past the checks' 1e-5.)"""
    config = dict(num_classes=4, depths=(2, 2, 2), depths_decoder=(2, 2, 2), dims=(32, 64, 128),
                  dims_decoder=(128, 64, 32), d_state=4)
    model = VMUNet(**{**config, **overrides})
    model.img_size = 32
    return model
