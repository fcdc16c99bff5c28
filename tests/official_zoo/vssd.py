"""VSSD (Shi et al. 2024; YuHengsss/VSSD `classification/models/mamba2.py`, `mamba_util.py`), reproduced
for tests.

Our own code, in their style and with their names: `Stem` (three conv stages, stride 4), stages of
`VMAMBA2Block` (a depthwise conv position encoding `cpe1` before the mixer and `cpe2` before the MLP)
whose mixer is `Mamba2` (in_proj to z, xBC, dt; a depthwise 2-D conv over the grid; then the SSD),
`PatchMerging` (1x1 conv, stride-2 depthwise 3x3, 1x1) between stages, attention in the last stage
(`ATTN_TYPES: ['mamba2', 'mamba2', 'mamba2', 'standard']`), a mean pool and the head. The released
configs (vssd_micro / tiny / small / base) all set `LINEAR_ATTN_DUALITY: True`: the mixer is the
non-causal SSD (`non_casual_linear_attn`: every token's state is the sum over all tokens of
B_t dt_t A x_t, read out with C), which is no scan; `mamba_chunk_scan_combined` is the ablation
(`linear_attn_duality=False`). Their `tTensor` wrapper (a Tensor subclass whose `shape` is ints) is
kept: the released forward passes x, dt, A, B and C through it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

PAPER = "VSSD: Vision Mamba with Non-Causal State Space Duality (arXiv 2407.18559)"
REPO = "YuHengsss/VSSD"


class tTensor(torch.Tensor):
    @property
    def shape(self):
        return tuple(int(s) for s in super().shape)


def to_ttensor(*args):
    return tuple(tTensor(x) for x in args) if len(args) > 1 else tTensor(args[0])


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), \
            nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvLayer(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, groups=1, bias=True,
                 norm=nn.BatchNorm2d, act_func=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = norm(num_features=out_channels) if norm else None
        self.act = act_func() if act_func else None

    def forward(self, x):
        x = self.conv(x)
        if self.norm:
            x = self.norm(x)
        if self.act:
            x = self.act(x)
        return x


class Stem(nn.Module):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=64):
        super().__init__()
        self.patches_resolution = [img_size // patch_size, img_size // patch_size]
        self.conv1 = ConvLayer(in_chans, embed_dim // 2, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Sequential(ConvLayer(embed_dim // 2, embed_dim // 2, 3, padding=1, bias=False),
                                   ConvLayer(embed_dim // 2, embed_dim // 2, 3, padding=1, bias=False, act_func=None))
        self.conv3 = nn.Sequential(ConvLayer(embed_dim // 2, embed_dim * 4, 3, stride=2, padding=1, bias=False),
                                   ConvLayer(embed_dim * 4, embed_dim, 1, bias=False, act_func=None))

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x) + x
        return self.conv3(x).flatten(2).transpose(1, 2)


class PatchMerging(nn.Module):
    def __init__(self, input_resolution, dim, ratio=4.0):
        super().__init__()
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(ConvLayer(dim, hidden, 1, norm=None),
                                  ConvLayer(hidden, hidden, 3, stride=2, padding=1, groups=hidden, norm=None),
                                  ConvLayer(hidden, 2 * dim, 1, act_func=None))

    def forward(self, x, H=None, W=None):
        B, L, C = x.shape
        return self.conv(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1)


class StandardAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, dim_head * heads * 3, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim)

    def forward(self, x, H, W):
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
        return self.to_out(rearrange(torch.einsum("bhij,bhjd->bhid", attn, v), "b h n d -> b n (h d)"))


class Mamba2(nn.Module):
    def __init__(self, d_model, d_conv=3, expand=2, headdim=64, ngroups=1, d_state=64, chunk_size=256,
                 linear_attn_duality=False, ssd_positve_dA=True):
        super().__init__()
        self.d_inner = expand * d_model
        self.headdim, self.d_state, self.ngroups = headdim, d_state, ngroups
        self.nheads = self.d_inner // headdim
        self.chunk_size, self.linear_attn_duality, self.ssd_positve_dA = chunk_size, linear_attn_duality, ssd_positve_dA
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.conv2d = nn.Conv2d(conv_dim, conv_dim, d_conv, padding=(d_conv - 1) // 2, groups=conv_dim)
        self.act = nn.SiLU()
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def non_casual_linear_attn(self, x, dt, A, B, C, D):
        batch, seqlen, head, dim = x.shape
        dstate = B.shape[2]
        V = x.permute(0, 2, 1, 3)
        dt = dt.permute(0, 2, 1)
        dA = dt.unsqueeze(-1) * A.view(1, -1, 1, 1).repeat(batch, 1, seqlen, 1)
        if self.ssd_positve_dA:
            dA = -dA
        K = B.view(batch, 1, seqlen, dstate)
        KV = K.transpose(-2, -1) @ (V * dA)
        x = C.view(batch, 1, seqlen, dstate) @ KV
        x = x + V * D.view(1, -1, 1, 1).repeat(batch, 1, seqlen, 1)
        return x.permute(0, 2, 1, 3).contiguous()

    def forward(self, u, H, W):
        batch, seqlen, dim = u.shape
        A = -torch.exp(self.A_log)
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                                   self.nheads], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        xBC = xBC.view(batch, H, W, -1).permute(0, 3, 1, 2).contiguous()
        xBC = self.act(self.conv2d(xBC))
        xBC = xBC.permute(0, 2, 3, 1).view(batch, H * W, -1).contiguous()
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x, dt, A, B, C = to_ttensor(x, dt, A, B, C)
        if self.linear_attn_duality:
            y = self.non_casual_linear_attn(rearrange(x, "b l (h p) -> b l h p", p=self.headdim), dt, A, B, C, self.D)
        else:
            y = mamba_chunk_scan_combined(
                rearrange(x, "b l (h p) -> b l h p", p=self.headdim), dt, A,
                rearrange(B, "b l (g n) -> b l g n", g=self.ngroups), rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
                chunk_size=self.chunk_size, D=self.D, z=None)
        y = self.norm(rearrange(y, "b l h p -> b l (h p)"))
        return self.out_proj(y * z)


class VMAMBA2Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_type="mamba2", ssd_expansion=2, d_state=64,
                 linear_attn_duality=False):
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == "standard":
            self.attn = StandardAttention(dim, heads=num_heads, dim_head=dim // num_heads)
        else:
            self.attn = Mamba2(dim, expand=ssd_expansion, headdim=dim * ssd_expansion // num_heads, d_state=d_state,
                               linear_attn_duality=linear_attn_duality)
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H=None, W=None):
        B, L, C = x.shape
        x = x + self.cpe1(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1)
        x = x + self.attn(self.norm1(x), H, W)
        x = x + self.cpe2(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, num_heads, downsample=None, input_resolution=None, **kwargs):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList([VMAMBA2Block(dim, num_heads, **kwargs) for _ in range(depth)])
        self.downsample = downsample(input_resolution, dim=dim) if downsample is not None else None

    def forward(self, x, H=None, W=None):
        for blk in self.blocks:
            x = blk(x, H, W)
        if self.downsample is not None:
            x = self.downsample(x, H, W)
        return x


class VMAMBA2(nn.Module):
    def __init__(self, img_size=224, patch_size=4, num_classes=1000, embed_dim=64, depths=(2, 4, 8, 4),
                 num_heads=(2, 4, 8, 16), mlp_ratio=4.0, d_state=64, linear_attn_duality=True,
                 attn_types=("mamba2", "mamba2", "mamba2", "standard")):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = Stem(img_size, patch_size, 3, embed_dim)
        resolution = self.patch_embed.patches_resolution
        self.layers = nn.ModuleList([
            BasicLayer(embed_dim * 2 ** i, depths[i], num_heads[i],
                       downsample=PatchMerging if i < len(depths) - 1 else None,
                       input_resolution=(resolution[0] // 2 ** i, resolution[1] // 2 ** i), mlp_ratio=mlp_ratio,
                       attn_type=attn_types[i], d_state=d_state, linear_attn_duality=linear_attn_duality)
            for i in range(len(depths))])
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        H, W = x.shape[-2:]
        x = self.patch_embed(x)
        H, W = H // 4, W // 4
        for layer in self.layers:
            x = layer(x, H, W)
            H, W = H // 2, W // 2
        x = self.avgpool(self.norm(x).transpose(1, 2))
        return torch.flatten(x, 1)

    def forward(self, x):
        return self.head(self.forward_features(x))


def tiny(linear_attn_duality=True):
    """The released structure (linear_attn_duality as the released configs set it) at 32 x 32: grids 8, 4, 2, 1."""
    return VMAMBA2(img_size=32, num_classes=10, embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8),
                   d_state=8, linear_attn_duality=linear_attn_duality)
