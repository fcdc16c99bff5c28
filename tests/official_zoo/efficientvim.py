"""EfficientViM (Lee et al. 2025; nukyan/EfficientViM `classification/models/EfficientViM.py`, `utils.py`),
reproduced for tests.

Our own code, in their style and with their names: a `Stem` of four stride-2 `ConvLayer2D`s, stages
of `EfficientViMBlock` (layer-scaled residuals through `sigmoid(alpha)`: a depthwise conv, the mixer
`HSMSSD` on the flattened grid, a second depthwise conv, a 1x1-conv `FFN`), `PatchMerging` (1x1 conv,
stride-2 depthwise conv, squeeze-excite, 1x1 conv) between stages, and a head that sums the logits of
every stage's pooled hidden state h with the final map's, weighted by a softmax. HSM-SSD is their
Mamba-2 (SSD) layer moved into the hidden-state space: dt, B and C come from a 1x1 conv and a
depthwise 3x3 conv over the grid, the "decay" is a softmax over all tokens of dt + A, the state h is
the sum over every token of x_t (A B)_t, mixed and gated in the N state slots, and read out with C.
Every token's output depends on every token: it is non-causal, with no scan. timm's SqueezeExcite
is written here in its structure (1x1 reduce, ReLU, 1x1 expand, sigmoid gate).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PAPER = "EfficientViM: Efficient Vision Mamba with Hidden State Mixer based State Space Duality (arXiv 2411.15241)"
REPO = "nukyan/EfficientViM"


class LayerNorm2D(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class LayerNorm1D(LayerNorm2D):
    """LayerNorm over the channels of a (B, C, L) tensor."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__(num_channels, eps)
        self.weight = nn.Parameter(torch.ones(1, num_channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1))


class _ConvLayer(nn.Module):
    """Their ConvLayer2D / ConvLayer1D: conv (no bias), optional BatchNorm (weight bn_weight_init), optional act."""

    conv_cls, norm_cls = nn.Conv2d, nn.BatchNorm2d

    def __init__(self, in_dim, out_dim, kernel_size=3, stride=1, padding=0, groups=1, norm=True,
                 act_layer=nn.ReLU, bn_weight_init=1):
        super().__init__()
        self.conv = self.conv_cls(in_dim, out_dim, kernel_size, stride, padding, groups=groups, bias=False)
        self.norm = self.norm_cls(num_features=out_dim) if norm else None
        self.act = act_layer() if act_layer else None
        if self.norm:
            nn.init.constant_(self.norm.weight, bn_weight_init)
            nn.init.constant_(self.norm.bias, 0)

    def forward(self, x):
        x = self.conv(x)
        if self.norm:
            x = self.norm(x)
        return self.act(x) if self.act else x


class ConvLayer2D(_ConvLayer):
    pass


class ConvLayer1D(_ConvLayer):
    conv_cls, norm_cls = nn.Conv1d, nn.BatchNorm1d


class FFN(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.fc1 = ConvLayer2D(in_dim, dim, 1)
        self.fc2 = ConvLayer2D(dim, in_dim, 1, act_layer=None, bn_weight_init=0)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, rd_ratio=0.25):
        super().__init__()
        rd = max(8, int(channels * rd_ratio + 4) // 8 * 8)
        self.conv_reduce = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU()
        self.conv_expand = nn.Conv2d(rd, channels, 1)

    def forward(self, x):
        gate = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class Stem(nn.Module):
    def __init__(self, in_dim=3, dim=96):
        super().__init__()
        self.conv = nn.Sequential(
            ConvLayer2D(in_dim, dim // 8, 3, 2, 1),
            ConvLayer2D(dim // 8, dim // 4, 3, 2, 1),
            ConvLayer2D(dim // 4, dim // 2, 3, 2, 1),
            ConvLayer2D(dim // 2, dim, 3, 2, 1, act_layer=None))

    def forward(self, x):
        return self.conv(x)


class PatchMerging(nn.Module):
    def __init__(self, in_dim, out_dim, ratio=4.0):
        super().__init__()
        hidden_dim = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer2D(in_dim, hidden_dim, 1),
            ConvLayer2D(hidden_dim, hidden_dim, 3, 2, 1, groups=hidden_dim),
            SqueezeExcite(hidden_dim, .25),
            ConvLayer2D(hidden_dim, out_dim, 1, act_layer=None))
        self.dwconv1 = ConvLayer2D(in_dim, in_dim, 3, padding=1, groups=in_dim, act_layer=None)
        self.dwconv2 = ConvLayer2D(out_dim, out_dim, 3, padding=1, groups=out_dim, act_layer=None)

    def forward(self, x):
        x = x + self.dwconv1(x)
        x = self.conv(x)
        return x + self.dwconv2(x)


class HSMSSD(nn.Module):
    def __init__(self, d_model, ssd_expand=1, A_init_range=(1, 16), state_dim=64):
        super().__init__()
        self.d_inner = int(ssd_expand * d_model)
        self.state_dim = state_dim
        self.BCdt_proj = ConvLayer1D(d_model, 3 * state_dim, 1, norm=False, act_layer=None)
        self.dw = ConvLayer2D(3 * state_dim, 3 * state_dim, 3, 1, 1, groups=3 * state_dim, norm=False, act_layer=None)
        self.hz_proj = ConvLayer1D(d_model, 2 * self.d_inner, 1, norm=False, act_layer=None)
        self.out_proj = ConvLayer1D(self.d_inner, d_model, 1, norm=False, act_layer=None, bn_weight_init=0)
        self.A = nn.Parameter(torch.empty(state_dim).uniform_(*A_init_range))
        self.act = nn.SiLU()
        self.D = nn.Parameter(torch.ones(1))

    def forward(self, x):
        batch, _, L = x.shape
        H = int(math.sqrt(L))
        BCdt = self.dw(self.BCdt_proj(x).view(batch, -1, H, H)).flatten(2)
        B, C, dt = torch.split(BCdt, [self.state_dim] * 3, dim=1)
        A = (dt + self.A.view(1, -1, 1)).softmax(-1)        # over every token
        h = x @ (A * B).transpose(-2, -1)                  # (B, C, N): a sum over every token
        h, z = torch.split(self.hz_proj(h), [self.d_inner, self.d_inner], dim=1)
        h = self.out_proj(h * self.act(z) + h * self.D)
        y = h @ C                                          # (B, C, L)
        return y.view(batch, -1, H, H).contiguous(), h


class EfficientViMBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4., ssd_expand=1, state_dim=64):
        super().__init__()
        self.mixer = HSMSSD(d_model=dim, ssd_expand=ssd_expand, state_dim=state_dim)
        self.norm = LayerNorm1D(dim)
        self.dwconv1 = ConvLayer2D(dim, dim, 3, padding=1, groups=dim, bn_weight_init=0, act_layer=None)
        self.dwconv2 = ConvLayer2D(dim, dim, 3, padding=1, groups=dim, bn_weight_init=0, act_layer=None)
        self.ffn = FFN(in_dim=dim, dim=int(dim * mlp_ratio))
        self.alpha = nn.Parameter(1e-4 * torch.ones(4, dim))

    def forward(self, x):
        alpha = torch.sigmoid(self.alpha).view(4, -1, 1, 1)
        x = (1 - alpha[0]) * x + alpha[0] * self.dwconv1(x)
        x_prev = x
        x, h = self.mixer(self.norm(x.flatten(2)))
        x = (1 - alpha[1]) * x_prev + alpha[1] * x
        x = (1 - alpha[2]) * x + alpha[2] * self.dwconv2(x)
        x = (1 - alpha[3]) * x + alpha[3] * self.ffn(x)
        return x, h


class EfficientViMStage(nn.Module):
    def __init__(self, in_dim, out_dim, depth, mlp_ratio=4., downsample=None, ssd_expand=1, state_dim=64):
        super().__init__()
        self.blocks = nn.ModuleList([EfficientViMBlock(in_dim, mlp_ratio, ssd_expand, state_dim) for _ in range(depth)])
        self.downsample = downsample(in_dim=in_dim, out_dim=out_dim) if downsample is not None else None

    def forward(self, x):
        for blk in self.blocks:
            x, h = blk(x)
        x_out = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, x_out, h


class EfficientViM(nn.Module):
    def __init__(self, in_dim=3, num_classes=1000, embed_dim=(128, 256, 512), depths=(2, 2, 2), mlp_ratio=4.,
                 ssd_expand=1, state_dim=(49, 25, 9)):
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = Stem(in_dim=in_dim, dim=embed_dim[0])
        self.stages = nn.ModuleList(
            EfficientViMStage(embed_dim[i], embed_dim[i + 1] if i < len(depths) - 1 else None, depths[i], mlp_ratio,
                              PatchMerging if i < len(depths) - 1 else None, ssd_expand, state_dim[i])
            for i in range(len(depths)))
        self.weights = nn.Parameter(torch.ones(4))        # multi-stage hidden-state fusion
        self.norm = nn.ModuleList([LayerNorm1D(embed_dim[0]), LayerNorm1D(embed_dim[1]), LayerNorm1D(embed_dim[2]),
                                   LayerNorm2D(embed_dim[2])])
        self.heads = nn.ModuleList([nn.Linear(embed_dim[i], num_classes) for i in (0, 1, 2, 2)])

    def forward(self, x):
        x = self.patch_embed(x)
        weights = self.weights.softmax(-1)
        z = torch.zeros((x.shape[0], self.num_classes), device=x.device)
        for i, stage in enumerate(self.stages):
            x, x_out, h = stage(x)
            h = F.adaptive_avg_pool1d(self.norm[i](h), 1).flatten(1)
            z = z + weights[i] * self.heads[i](h)
        x = F.adaptive_avg_pool2d(self.norm[3](x), 1).flatten(1)
        return z + weights[3] * self.heads[3](x)


def tiny():
    """EfficientViM-M1's structure (three stages, HSM-SSD in every block) at 64 x 64: grids 4, 2, 1."""
    model = EfficientViM(num_classes=10, embed_dim=(16, 24, 32), depths=(2, 2, 1), state_dim=(9, 4, 4))
    model.img_size = 64
    return model
