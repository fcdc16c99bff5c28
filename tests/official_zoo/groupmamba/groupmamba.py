"""GroupMamba's groupmamba.py: stages, blocks, the grouped mixer and the class block."""
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from .csms6s import CrossMerge_1, CrossMerge_2, CrossMerge_3, CrossMerge_4
from .csms6s import CrossScan_1, CrossScan_2, CrossScan_3, CrossScan_4
from .ss2d import SS2D


class FFN(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), nn.GELU(), \
            nn.Linear(hidden_features, in_features)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.fc1(x)))


class DWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.transpose(1, 2).view(B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)


class PVT2FFN(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class GroupMambaLayer(nn.Module):
    def __init__(self, input_dim, output_dim, d_state=1, d_conv=3, expand=1, reduction=16):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, input_dim // reduction, bias=True)
        self.fc2 = nn.Linear(input_dim // reduction, output_dim, bias=True)
        self.relu, self.sigmoid = nn.ReLU(), nn.Sigmoid()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.norm = nn.LayerNorm(input_dim)
        for g in range(1, 5):
            setattr(self, f"mamba_g{g}", SS2D(d_model=input_dim // 4, d_state=d_state, ssm_ratio=expand, d_conv=d_conv))
        self.proj = nn.Linear(input_dim, output_dim)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = self.norm(x)
        z = x.permute(0, 2, 1).mean(dim=2)
        fc_out_2 = self.sigmoid(self.fc2(self.relu(self.fc1(z))))
        x = rearrange(x, "b (h w) c -> b h w c", b=B, h=H, w=W, c=C)
        x1, x2, x3, x4 = torch.chunk(x, 4, dim=-1)
        x_mamba1 = self.mamba_g1(x1, CrossScan=CrossScan_1, CrossMerge=CrossMerge_1)
        x_mamba2 = self.mamba_g2(x2, CrossScan=CrossScan_2, CrossMerge=CrossMerge_2)
        x_mamba3 = self.mamba_g3(x3, CrossScan=CrossScan_3, CrossMerge=CrossMerge_3)
        x_mamba4 = self.mamba_g4(x4, CrossScan=CrossScan_4, CrossMerge=CrossMerge_4)
        x_mamba = torch.cat([x_mamba1, x_mamba2, x_mamba3, x_mamba4], dim=-1) * self.skip_scale * x
        x_mamba = rearrange(x_mamba, "b h w c -> b (h w) c", b=B, h=H, w=W, c=C)
        x_mamba = x_mamba * fc_out_2.unsqueeze(1)
        return self.proj(self.norm(x_mamba))


class ClassBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
        self.attn = GroupMambaLayer(dim, dim)
        self.mlp = FFN(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        cls_embed = x[:, :1]
        cls_embed = cls_embed + self.norm1(self.attn(x[:, :1], H, W))
        cls_embed = cls_embed + self.mlp(self.norm2(cls_embed), H, W)
        return torch.cat([cls_embed, x[:, 1:]], dim=1)


class Block_mamba(nn.Module):
    def __init__(self, dim, mlp_ratio, drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.attn = GroupMambaLayer(dim, dim)
        self.mlp = PVT2FFN(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path = nn.Identity()

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(x, H, W))
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


class GroupMamba(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, stem_hidden_dim=32, embed_dims=(64, 128, 348, 448),
                 mlp_ratios=(8, 8, 4, 4), norm_layer=nn.LayerNorm, depths=(3, 4, 6, 3), num_stages=4,
                 distillation=True, img_size=224):
        super().__init__()
        self.num_classes, self.depths, self.num_stages, self.img_size = num_classes, depths, num_stages, img_size
        for i in range(num_stages):
            patch_embed = Stem(in_chans, stem_hidden_dim, embed_dims[i]) if i == 0 else \
                DownSamples(embed_dims[i - 1], embed_dims[i])
            block = nn.ModuleList(Block_mamba(dim=embed_dims[i], mlp_ratio=mlp_ratios[i], norm_layer=norm_layer)
                                  for _ in range(depths[i]))
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
        self.post_network = nn.ModuleList([ClassBlock(dim=embed_dims[-1], mlp_ratio=mlp_ratios[-1],
                                                      norm_layer=norm_layer)])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.dist = distillation
        if self.dist:
            self.dist_head = nn.Linear(embed_dims[-1], num_classes)

    def forward_cls(self, x, H, W):
        cls_tokens = x.mean(dim=1, keepdim=True)
        x = torch.cat((cls_tokens, x), dim=1)
        for block in self.post_network:
            x = block(x, H, W)
        return x

    def forward_features(self, x):
        B = x.shape[0]
        for i in range(self.num_stages):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, H, W)
            if i != self.num_stages - 1:
                x = getattr(self, f"norm{i + 1}")(x)
                x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        x = self.forward_cls(x, 1, 1)[:, 0]
        return getattr(self, f"norm{self.num_stages}")(x)

    def forward(self, x):
        x = self.forward_features(x)
        if self.dist:
            cls_out = self.head(x), self.dist_head(x)
            if not self.training:
                cls_out = (cls_out[0] + cls_out[1]) / 2
            return cls_out
        return self.head(x)


def tiny(**overrides):
    """groupmamba_tiny's structure at 64 px: stages of 16x16, 8x8, 4x4, 2x2 tokens."""
    config = dict(stem_hidden_dim=8, embed_dims=(32, 32, 64, 64), mlp_ratios=(2, 2, 2, 2),
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=(2, 2, 2, 1), num_classes=10, img_size=64)
    return GroupMamba(**{**config, **overrides})
