"""SiMBA (Patro & Agneeswaran 2024; badripatro/simba `classification/simba.py`), reproduced for tests.

Our own code, in their style and with their names: a 4-stage model (`Stem`, `DownSamples`,
`Block_mamba` = `MambaLayer` (LayerNorm + mamba_ssm's `Mamba`, `from mamba_ssm import Mamba`) plus the
released channel mixer `PVT2FFN` (`cm_type='mlp'`; EinFFT is the commented alternative), a final
`ClassBlock` on the mean token), in its released token-labelling forward (`token_label=True`):
`forward_embeddings` / `forward_tokens`, and at eval `head(x[:, 0]) + 0.5 * aux_head(x[:, 1:]).max(1)[0]`.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from mamba_ssm import Mamba

PAPER = "SiMBA: Simplified Mamba-Based Architecture for Vision and Multivariate Time series (arXiv 2403.15360)"
REPO = "badripatro/simba"
# tiny(): every stage ends in a dense downsampling, so pruning its sites removes 0.244 of the FLOPs at most;
# the checks run at 0.2
RATIO = 0.2


class MambaLayer(nn.Module):
    def __init__(self, dim, d_state=64, d_conv=4, expand=2):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x):
        return self.mamba(self.norm(x))


class DWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).view(B, C, H, W)).flatten(2).transpose(1, 2)


class PVT2FFN(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class FFN(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), nn.GELU(), \
            nn.Linear(hidden_features, in_features)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.fc1(x)))


class ClassBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, norm_layer=nn.LayerNorm, d_state=64):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.attn = MambaLayer(dim, d_state=d_state)
        self.mlp = FFN(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        cls_embed = x[:, :1]
        cls_embed = cls_embed + self.attn(x[:, :1])
        cls_embed = cls_embed + self.mlp(self.norm2(cls_embed), H, W)
        return torch.cat([cls_embed, x[:, 1:]], dim=1)


class Block_mamba(nn.Module):
    def __init__(self, dim, mlp_ratio, norm_layer=nn.LayerNorm, d_state=64):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.attn = MambaLayer(dim, d_state=d_state)
        self.mlp = PVT2FFN(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path = nn.Identity()

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class DownSamples(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class Stem(nn.Module):
    def __init__(self, in_channels, stem_hidden_dim, out_channels):
        super().__init__()
        hidden = stem_hidden_dim
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 7, 2, 3, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(hidden, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x):
        x = self.proj(self.conv(x))
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class SiMBA(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, stem_hidden_dim=32, embed_dims=(64, 128, 320, 448),
                 mlp_ratios=(8, 8, 4, 4), norm_layer=nn.LayerNorm, depths=(3, 4, 6, 3), num_stages=4,
                 token_label=True, d_state=64, img_size=224):
        super().__init__()
        self.num_classes, self.depths, self.num_stages, self.img_size = num_classes, depths, num_stages, img_size
        for i in range(num_stages):
            patch_embed = Stem(in_chans, stem_hidden_dim, embed_dims[i]) if i == 0 else \
                DownSamples(embed_dims[i - 1], embed_dims[i])
            block = nn.ModuleList(Block_mamba(embed_dims[i], mlp_ratios[i], norm_layer, d_state)
                                  for _ in range(depths[i]))
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
        self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], mlp_ratios[-1], norm_layer, d_state)])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.return_dense = self.mix_token = token_label
        if self.return_dense:
            self.aux_head = nn.Linear(embed_dims[-1], num_classes)

    def forward_cls(self, x, H, W):
        cls_tokens = x.mean(dim=1, keepdim=True)
        x = torch.cat((cls_tokens, x), dim=1)
        for block in self.post_network:
            x = block(x, H, W)
        return x

    def forward_tokens(self, x, H, W):
        B = x.shape[0]
        x = x.view(B, -1, x.size(-1))
        for i in range(self.num_stages):
            if i != 0:
                x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, H, W)
            if i != self.num_stages - 1:
                x = getattr(self, f"norm{i + 1}")(x)
                x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        x = self.forward_cls(x, H, W)
        return getattr(self, f"norm{self.num_stages}")(x)

    def forward_embeddings(self, x):
        x, H, W = self.patch_embed1(x)
        return x.view(x.size(0), H, W, -1), H, W

    def forward(self, x):
        x, H, W = self.forward_embeddings(x)
        x = self.forward_tokens(x, H, W)
        x_cls = self.head(x[:, 0])
        x_aux = self.aux_head(x[:, 1:])
        return x_cls + 0.5 * x_aux.max(1)[0]      # eval, token labelling


def tiny(**overrides):
    """simba_s's structure at 64 px: stages of 16x16, 8x8, 4x4, 2x2 tokens."""
    config = dict(stem_hidden_dim=8, embed_dims=(16, 32, 32, 32), mlp_ratios=(2, 2, 2, 2),
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=(2, 2, 2, 1), num_classes=10, d_state=4,
                  img_size=64)
    return SiMBA(**{**config, **overrides})
