"""VideoMamba in image mode (Li et al. 2024; OpenGVLab/VideoMamba `videomamba/image_sm/models/videomamba.py`
and its mamba fork `mamba/mamba_ssm/modules/mamba_simple.py`), reproduced for tests.

Our own code, in their style and with their names: the image model `VisionMamba` (class token at the
HEAD, `torch.cat((cls_token, x), 1)`, absolute position embedding, fused add + RMSNorm with the
residual in fp32, `hidden_states[:, 0, :]` through the head) on the fork's `Mamba(bimamba=True)`:
forward and backward directions with their own conv1d / x_proj / dt_proj / A / D, each through
mamba_ssm's `mamba_inner_fn_no_out_proj` on `xz` and `xz.flip([-1])`, the two outputs summed (not
halved, unlike ViM's `if_devide_out`) before out_proj.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn_no_out_proj
from mamba_ssm.ops.triton.layernorm import RMSNorm, rms_norm_fn

PAPER = "VideoMamba: State Space Model for Efficient Video Understanding (arXiv 2403.06977), image models"
REPO = "OpenGVLab/VideoMamba"


class Mamba(nn.Module):
    """The fork's mamba_simple.Mamba with bimamba=True."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 conv_bias=True, bias=False, layer_idx=None, bimamba=True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.bimamba, self.layer_idx = bimamba, layer_idx
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                       padding=d_conv - 1, bias=conv_bias))
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            std = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            with torch.no_grad():
                dt = dt.clamp(min=dt_init_floor)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            setattr(self, "dt_proj" + suffix, dt_proj)
        A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_b_log = nn.Parameter(torch.log(A.clone()))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states, inference_params=None):
        seqlen = hidden_states.shape[1]
        xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l",
                       l=seqlen)
        A = -torch.exp(self.A_log.float())
        A_b = -torch.exp(self.A_b_log.float())
        out = mamba_inner_fn_no_out_proj(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                         self.dt_proj.weight, A, None, None, self.D.float(),
                                         delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        out_b = mamba_inner_fn_no_out_proj(xz.flip([-1]), self.conv1d_b.weight, self.conv1d_b.bias,
                                           self.x_proj_b.weight, self.dt_proj_b.weight, A_b, None, None,
                                           self.D_b.float(), delta_bias=self.dt_proj_b.bias.float(),
                                           delta_softplus=True)
        return F.linear(rearrange(out + out_b.flip([-1]), "b d l -> b l d"), self.out_proj.weight,
                        self.out_proj.bias)


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = ((img_size - patch_size) // stride + 1,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Block(nn.Module):
    def __init__(self, dim, mixer_cls, norm_cls, residual_in_fp32=True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer_cls(dim)
        self.norm = norm_cls(dim)
        self.drop_path = nn.Identity()

    def forward(self, hidden_states, residual=None, inference_params=None):
        hidden_states, residual = rms_norm_fn(hidden_states if residual is None else self.drop_path(hidden_states),
                                              self.norm.weight, self.norm.bias, residual=residual, prenorm=True,
                                              residual_in_fp32=self.residual_in_fp32, eps=self.norm.eps)
        return self.mixer(hidden_states, inference_params=inference_params), residual


def create_block(d_model, ssm_cfg=None, norm_epsilon=1e-5, residual_in_fp32=True, layer_idx=None, bimamba=True):
    mixer_cls = partial(Mamba, layer_idx=layer_idx, bimamba=bimamba, **(ssm_cfg or {}))
    block = Block(d_model, mixer_cls, partial(RMSNorm, eps=norm_epsilon), residual_in_fp32)
    block.layer_idx = layer_idx
    return block


class VisionMamba(nn.Module):
    def __init__(self, img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192, channels=3,
                 num_classes=1000, ssm_cfg=None, norm_epsilon=1e-5, residual_in_fp32=True, bimamba=True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)
        self.head = nn.Linear(embed_dim, num_classes)
        self.drop_path = nn.Identity()
        self.layers = nn.ModuleList(create_block(embed_dim, ssm_cfg, norm_epsilon, residual_in_fp32, i, bimamba)
                                    for i in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x, inference_params=None):
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        residual, hidden_states = None, x
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
        hidden_states = rms_norm_fn(self.drop_path(hidden_states), self.norm_f.weight, self.norm_f.bias,
                                    eps=self.norm_f.eps, residual=residual, prenorm=False,
                                    residual_in_fp32=self.residual_in_fp32)
        return hidden_states[:, 0, :]

    def forward(self, x, inference_params=None):
        return self.head(self.forward_features(x, inference_params))


def tiny(**overrides):
    """videomamba_tiny's structure at 16 patches."""
    config = dict(img_size=32, patch_size=8, stride=8, depth=4, embed_dim=32, num_classes=10,
                  ssm_cfg={"d_state": 4})
    return VisionMamba(**{**config, **overrides})
