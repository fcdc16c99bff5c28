"""PlainMamba as its authors wrote it (ChenhongyiYang/PlainMamba, mmcls code), reproduced for tests.

Our own code, written to compute exactly what theirs computes, in its style: mmcls-like classes
(`ConvPatchEmbed`, `PlainMamba2D`, `PlainMambaLayer`, the `PlainMamba` backbone with its `arch_zoo`,
the `CustomAveragePooling` neck, a `LinearClsHead` and the `ImageClassifier` around them), their
module names and config keys, so that `ImageClassifier.state_dict()` has the keys of their mmcls
checkpoints (`backbone.*`, `head.fc.*`, the final norm `backbone.ln1`). As theirs, the mixer calls
`selective_scan_fn` imported from mamba_ssm at module level (tests install a stand-in package:
tests/mamba_ssm_stub.py), with u in zig-zag order and dt, B, C in raster order, a per-step
direction offset added to B, and the inverse order applied to each scan's output.

Import it only with the stand-in installed (`mamba_ssm_stub.installed()`).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # the stand-in, in tests


def trunc_normal_(tensor, std=0.02):
    with torch.no_grad():
        return tensor.normal_(0, std).clamp_(-2 * std, 2 * std)


class ConvPatchEmbed(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU), `num_convs` 3x3 conv-BN-ReLU, a (p/2)x(p/2)/(p/2) projection."""

    def __init__(self, in_channels=3, embed_dims=768, num_convs=0, patch_size=16, stride=16, input_size=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, (7, 7), (2, 2), 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(True))
        convs = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(64, 64, (3, 3), (1, 1), 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True)]
        self.convs = nn.Sequential(*convs) if convs else None
        half = patch_size // 2
        self.projection = nn.Conv2d(64, embed_dims, kernel_size=(half, half), stride=(stride // 2, stride // 2))
        size = input_size // 2
        self.init_out_size = ((size - half) // (stride // 2) + 1,) * 2

    def forward(self, x):
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        x = self.projection(x)
        out_size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), out_size


def snake_orders(H, W):
    """The four paths of their `get_permute_order`: a row snake from the top-left, the same walked
    back, a column snake from the top-left, the same walked back; per path its inverse and, per
    step, the code of the move that reached it (0 start, 1 right, 2 left, 3 up, 4 down)."""
    def row_snake():
        return [(i, j if i % 2 == 0 else W - 1 - j) for i in range(H) for j in range(W)]

    def column_snake():
        return [(i if j % 2 == 0 else H - 1 - i, j) for j in range(W) for i in range(H)]

    moves = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    orders, inverses, directions = [], [], []
    for cells in (row_snake(), row_snake()[::-1], column_snake(), column_snake()[::-1]):
        order = tuple(i * W + j for i, j in cells)
        inverse = [0] * len(order)
        for step, idx in enumerate(order):
            inverse[idx] = step
        codes = (0,) + tuple(moves[(b[0] - a[0], b[1] - a[1])] for a, b in zip(cells[:-1], cells[1:]))
        orders.append(order)
        inverses.append(tuple(inverse))
        directions.append(codes)
    return tuple(orders), tuple(inverses), tuple(directions)


class PlainMamba2D(nn.Module):
    def __init__(self, d_model, d_state=16, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, dt_init="random",
                 dt_scale=1.0, dt_init_floor=1e-4, conv_size=7, conv_bias=True, bias=False, init_layer_scale=None,
                 default_hw_shape=None):
        super().__init__()
        self.d_model, self.d_state, self.expand = d_model, d_state, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.default_hw_shape = default_hw_shape
        self.n_directions = 4
        self.init_layer_scale = init_layer_scale
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model))
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, (conv_size, conv_size), (1, 1),
                                (conv_size // 2, conv_size // 2), groups=self.d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.direction_Bs = nn.Parameter(trunc_normal_(torch.zeros(self.n_directions + 1, self.d_state)))

    def forward(self, x, hw_shape):
        batch_size, L, _ = x.shape
        H, W = hw_shape
        E = self.d_inner
        xz = self.in_proj(x)
        A = -torch.exp(self.A_log.float())
        x, z = xz.chunk(2, dim=-1)
        x_2d = self.act(self.conv2d(x.reshape(batch_size, H, W, E).permute(0, 3, 1, 2)))
        x_conv = x_2d.permute(0, 2, 3, 1).reshape(batch_size, L, E)
        dt, B, C = torch.split(self.x_proj(x_conv), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).permute(0, 2, 1).contiguous()
        B = B.permute(0, 2, 1).contiguous()
        C = C.permute(0, 2, 1).contiguous()
        orders, inverse_orders, directions = snake_orders(H, W)
        direction_Bs = [self.direction_Bs[d, :] for d in directions]
        direction_Bs = [dB[None].expand(batch_size, -1, -1).permute(0, 2, 1).to(dtype=B.dtype) for dB in direction_Bs]
        ys = [selective_scan_fn(x_conv[:, o, :].permute(0, 2, 1).contiguous(), dt, A, (B + dB).contiguous(), C,
                                self.D.float(), z=None, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                                return_last_state=False).permute(0, 2, 1)[:, inv_o, :]
              for o, inv_o, dB in zip(orders, inverse_orders, direction_Bs)]
        out = self.out_proj(sum(ys) * self.act(z))
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out


class PlainMambaLayer(nn.Module):
    def __init__(self, embed_dims, use_rms_norm, with_dwconv, drop_path_rate, mamba_cfg):
        super().__init__()
        mamba_cfg.update({"d_model": embed_dims})
        self.norm = nn.LayerNorm(embed_dims)
        self.with_dwconv = with_dwconv
        if with_dwconv:
            self.dw = nn.Sequential(nn.Conv2d(embed_dims, embed_dims, (3, 3), padding=(1, 1), bias=False,
                                              groups=embed_dims), nn.BatchNorm2d(embed_dims), nn.GELU())
        self.mamba = PlainMamba2D(**mamba_cfg)
        self.drop_path = nn.Identity()     # DropPath(drop_path_rate) is the identity in eval mode

    def forward(self, x, hw_shape):
        mixed_x = self.drop_path(self.mamba(self.norm(x), hw_shape)) + x
        if self.with_dwconv:
            b, _, c = mixed_x.shape
            h, w = hw_shape
            mixed_x = self.dw(mixed_x.reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, h * w).permute(0, 2, 1)
        return mixed_x


def _mamba_cfg():
    return {"d_state": 16, "expand": 2, "conv_size": 7, "dt_init": "random", "conv_bias": True, "bias": True,
            "default_hw_shape": (14, 14)}


class PlainMamba(nn.Module):
    """Their backbone: returns (tokens after the final norm `ln1`, (grid of the last layer,))."""

    arch_zoo = {
        "L1": {"patch_size": 16, "embed_dims": 192, "num_layers": 24, "num_convs_patch_embed": 1,
               "layers_with_dwconv": [0], "layer_cfgs": {"use_rms_norm": False, "mamba_cfg": _mamba_cfg()}},
        "L2": {"patch_size": 16, "embed_dims": 384, "num_layers": 24, "num_convs_patch_embed": 2,
               "layers_with_dwconv": [], "layer_cfgs": {"use_rms_norm": False, "mamba_cfg": _mamba_cfg()}},
        "L3": {"patch_size": 16, "embed_dims": 448, "num_layers": 36, "num_convs_patch_embed": 2,
               "layers_with_dwconv": [], "layer_cfgs": {"use_rms_norm": False, "mamba_cfg": _mamba_cfg()}},
    }

    def __init__(self, img_size=224, in_channels=3, arch=None, patch_size=16, embed_dims=192, num_layers=20,
                 num_convs_patch_embed=1, with_pos_embed=True, out_indices=-1, drop_rate=0.0, drop_path_rate=0.0,
                 final_norm=True, layer_cfgs=None, layers_with_dwconv=(), **kwargs):
        super().__init__()
        cfg = self.arch_zoo[arch] if arch is not None else {
            "patch_size": patch_size, "embed_dims": embed_dims, "num_layers": num_layers,
            "num_convs_patch_embed": num_convs_patch_embed, "layers_with_dwconv": list(layers_with_dwconv),
            "layer_cfgs": layer_cfgs or {}}
        self.embed_dims, self.num_layers = cfg["embed_dims"], cfg["num_layers"]
        self.patch_embed = ConvPatchEmbed(in_channels, self.embed_dims, cfg["num_convs_patch_embed"],
                                          cfg["patch_size"], cfg["patch_size"], img_size)
        self.patch_resolution = self.patch_embed.init_out_size
        num_patches = self.patch_resolution[0] * self.patch_resolution[1]
        self.with_pos_embed = with_pos_embed
        if with_pos_embed:
            self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_patches, self.embed_dims)))
        self.drop_after_pos = nn.Dropout(p=drop_rate)
        self.out_indices = [self.num_layers + out_indices if out_indices < 0 else out_indices]
        dpr = np.linspace(0, drop_path_rate, self.num_layers)
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            layer_cfg = copy.deepcopy(cfg["layer_cfgs"])
            layer_cfg.update({"embed_dims": self.embed_dims, "drop_path_rate": dpr[i],
                              "with_dwconv": i in cfg["layers_with_dwconv"]})
            self.layers.append(PlainMambaLayer(**layer_cfg))
        self.final_norm = final_norm
        if final_norm:
            self.norm1_name = "ln1"
            self.add_module("ln1", nn.LayerNorm(self.embed_dims, eps=1e-6))

    def forward(self, x):
        x, patch_resolution = self.patch_embed(x)
        if self.with_pos_embed:
            x = x + self.pos_embed          # resize_pos_embed is the identity at the training resolution
        x = self.drop_after_pos(x)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x, hw_shape=patch_resolution)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                B, _, C = x.shape
                outs.append(x.reshape(B, *patch_resolution, C).permute(0, 3, 1, 2))
        return x, tuple(outs)


class CustomAveragePooling(nn.Module):
    def forward(self, inputs):
        return torch.mean(inputs[0], dim=1)


class LinearClsHead(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(x)


class ImageClassifier(nn.Module):
    """mmcls's classifier at test time: backbone -> neck -> head logits."""

    def __init__(self, backbone: dict, num_classes: int = 1000):
        super().__init__()
        self.backbone = PlainMamba(**backbone)
        self.neck = CustomAveragePooling()
        self.head = LinearClsHead(num_classes, self.backbone.embed_dims)
        self.img_size = backbone.get("img_size", 224)

    def forward(self, img):
        return self.head(self.neck(self.backbone(img)))


def tiny_classifier(num_classes=10, **backbone):
    """A tiny PlainMamba-L1-like classifier (custom arch: the config keys of their arch_zoo)."""
    cfg = {"img_size": 32, "patch_size": 4, "embed_dims": 64, "num_layers": 8, "num_convs_patch_embed": 1,
           "layers_with_dwconv": [0], "layer_cfgs": {"use_rms_norm": False, "mamba_cfg": {
               "d_state": 4, "expand": 2, "conv_size": 7, "conv_bias": True, "bias": True,
               "default_hw_shape": (8, 8)}}}
    cfg.update(backbone)
    return ImageClassifier(cfg, num_classes)
