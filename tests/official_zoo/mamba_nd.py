"""Mamba-ND for images (Li et al., ECCV 2024; jacklishufan/Mamba-ND `image_classification/src/mamba.py`,
`config/mamba2d.py`), reproduced for tests.

Our own code, in their mmpretrain style and with their names: `Mamba2DModel` (patch embedding,
position embedding, no class token, `out_type='avg_featmap'`: final norm `ln1`, token mean, `ln2`)
of `Block`s around mamba_ssm's plain, one-direction `Mamba` (`from mamba_ssm import Mamba`, its fast
path `mamba_inner_fn`). The multi-dimensional scan is the ORDER OF THE LAYERS: layer i flips the
sequence when i is odd and reads it column-major (`rearrange(x, 'n (h w) c -> n (w h) c')`) when
i % 4 >= 2, and undoes both after its mixer. Released `fused_add_norm=False` block as they wrote it:
`h = norm(h); h = h + mixer(h)` (the normed tokens are the residual). The released config also has
`downsample=(9,)`: after block 9 an mmpretrain `PatchMerging` (2x2 `nn.Unfold`, LayerNorm, linear)
quarters the tokens, `constant_dim=True` keeping the width.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from mamba_ssm import Mamba

PAPER = "Mamba-ND: Selective State Space Modeling for Multi-Dimensional Data (arXiv 2402.05892)"
REPO = "jacklishufan/Mamba-ND"


class PatchEmbed(nn.Module):
    """mmcv's PatchEmbed with a Conv2d projection: returns (tokens, (h, w))."""

    def __init__(self, in_channels=3, embed_dims=768, kernel_size=16, stride=16, input_size=224):
        super().__init__()
        self.projection = nn.Conv2d(in_channels, embed_dims, kernel_size, stride)
        self.init_out_size = ((input_size - kernel_size) // stride + 1,) * 2

    def forward(self, x):
        x = self.projection(x)
        out_size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), out_size


class PatchMerging(nn.Module):
    """mmpretrain's PatchMerging: 2x2 neighbourhoods by nn.Unfold, LayerNorm, linear reduction."""

    def __init__(self, in_channels, out_channels, kernel_size=2):
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=kernel_size, dilation=1, padding=0, stride=kernel_size)
        self.norm = nn.LayerNorm(kernel_size * kernel_size * in_channels)
        self.reduction = nn.Linear(kernel_size * kernel_size * in_channels, out_channels, bias=False)
        self.kernel_size = kernel_size

    def forward(self, x, input_size):
        B, L, C = x.shape
        H, W = input_size
        x = x.view(B, H, W, C).permute([0, 3, 1, 2])
        x = self.sampler(x)
        out_size = (H // self.kernel_size, W // self.kernel_size)
        x = x.transpose(1, 2)
        return self.reduction(self.norm(x)), out_size


class Block(nn.Module):
    def __init__(self, dim, mixer_cls, norm_cls=nn.LayerNorm, reverse=False, transpose=False, downsample=False):
        super().__init__()
        self.mixer = mixer_cls(dim)
        self.norm = norm_cls(dim)
        self.reverse, self.transpose, self.downsample = reverse, transpose, downsample
        self.drop_path = nn.Identity()
        if downsample:
            self.down_sample_layer = PatchMerging(dim, dim)

    def forward(self, hidden_states, residual=None, inference_params=None, skip=True, **kwargs):
        h = w = 0
        if self.transpose:
            l = hidden_states.shape[1]
            h = w = int(np.sqrt(l))
            hidden_states = rearrange(hidden_states, "n (h w) c -> n (w h) c", h=h, w=w)
        if self.reverse:
            hidden_states = hidden_states.flip(1)
        hidden_states = self.norm(hidden_states)
        hidden_states = hidden_states + self.drop_path(self.mixer(hidden_states, inference_params=inference_params))
        if self.reverse:
            hidden_states = hidden_states.flip(1)
        if self.transpose:
            hidden_states = rearrange(hidden_states, "n (w h) c -> n (h w) c", h=h, w=w)
        if self.downsample:
            h, w = kwargs["h"], kwargs["w"]
            hidden_states, (h, w) = self.down_sample_layer(hidden_states, (h, w))
            residual = (h, w)
        return hidden_states, residual


class Mamba2DModel(nn.Module):
    def __init__(self, img_size=224, patch_size=8, embed_dims=384, num_layers=12, d_state=16, downsample=(9,),
                 has_transpose=True, has_reverse=True):
        super().__init__()
        self.embed_dims = embed_dims
        self.num_layers = num_layers * 2          # use_mlp=False doubles the layers
        self.downsample = list(downsample)
        self.patch_embed = PatchEmbed(3, embed_dims, patch_size, patch_size, img_size)
        self.patch_resolution = self.patch_embed.init_out_size
        num_patches = self.patch_resolution[0] * self.patch_resolution[1]
        self.cls_token = None
        self.num_extra_tokens = 0
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dims))
        self.drop_after_pos = nn.Dropout(p=0.0)
        self.out_indices = [self.num_layers - 1]
        self.layers = nn.ModuleList(
            Block(embed_dims, lambda d: Mamba(d, d_state=d_state), nn.LayerNorm,
                  reverse=(i % 2) > 0 and has_reverse, transpose=has_transpose and (i % 4) >= 2,
                  downsample=i in self.downsample) for i in range(self.num_layers))
        self.pre_norm = nn.Identity()
        self.ln1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.ln2 = nn.LayerNorm(embed_dims, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x):
        x, patch_resolution = self.patch_embed(x)
        x = x + self.pos_embed                    # resize_pos_embed is the identity at the training size
        x = self.pre_norm(self.drop_after_pos(x))
        h, w = patch_resolution
        outs, residual = [], None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, h=h, w=w)
            if layer.downsample:
                h, w = residual
                residual = None
            if i == len(self.layers) - 1:
                x = (x + residual) if residual is not None else x
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self.ln2(x.mean(dim=1)))   # _format_output('avg_featmap')
        return tuple(outs)


class ImageClassifier(nn.Module):
    """mmpretrain's ImageClassifier at test time: backbone, no neck, LinearClsHead's fc on the last output."""

    def __init__(self, backbone: dict, num_classes=1000):
        super().__init__()
        self.backbone = Mamba2DModel(**backbone)
        self.head = nn.Module()
        self.head.fc = nn.Linear(self.backbone.embed_dims, num_classes)
        self.img_size = backbone.get("img_size", 224)

    def forward(self, inputs):
        return self.head.fc(self.backbone(inputs)[-1])


def tiny(**overrides):
    """config/mamba2d.py's structure: 6 layers (3 x 2) on an 8 x 8 grid, PatchMerging after layer 3."""
    backbone = dict(img_size=32, patch_size=4, embed_dims=32, num_layers=3, d_state=4, downsample=(3,))
    return ImageClassifier({**backbone, **overrides}, num_classes=10)
