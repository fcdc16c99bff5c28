"""Vision Mamba as its authors wrote it (hustvl/Vim: vim/models_mamba.py and the Mamba mixer of their
mamba_ssm fork, mamba-1p1p1/mamba_ssm/modules/mamba_simple.py), reproduced for tests.

Our own code, written to compute what theirs computes on the released configuration ("bimamba v2",
middle class token, RMSNorm with the fused add + norm, residual in fp32, outputs of the two
directions summed and halved), in their style and with their module names, so that
`VisionMamba.state_dict()` has the keys of their released `{"model": ...}` checkpoints. As theirs,
the mixer builds `xz` with one matmul, runs `mamba_inner_fn_no_out_proj` forward and on the flipped
`xz`, and the blocks call `rms_norm_fn(..., prenorm=True, residual_in_fp32=True)`; those entry points
come from mamba_ssm (tests install a stand-in package: tests/mamba_ssm_stub.py).

Not reproduced (off in every released model): rope, random class-token positions, sequence flips,
`if_bidirectional`, double class tokens, inference caches, drop path (identity at eval).

Import it only with the stand-in installed (`mamba_ssm_stub.installed()`).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn_no_out_proj  # the stand-in, in tests
from mamba_ssm.ops.triton.layernorm import RMSNorm, rms_norm_fn


class PatchEmbed(nn.Module):
    """Conv patch embedding (kernel `patch_size`, stride `stride`), flattened to (B, L, C)."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = ((img_size - patch_size) // stride + 1,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Mamba(nn.Module):
    """The fork's Mamba mixer with bimamba_type="v2": a second conv1d / x_proj / dt_proj / A / D set
    for the backward direction, one shared in_proj and out_proj."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, if_devide_out=True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.if_devide_out = if_devide_out
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                       padding=d_conv - 1))
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            std = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            dt = dt.clamp(min=1e-4)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1
            setattr(self, "dt_proj" + suffix, dt_proj)
        A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.A_b_log = nn.Parameter(torch.log(A.clone()))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

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
        both = rearrange(out + out_b.flip([-1]), "b d l -> b l d")
        if self.if_devide_out:
            both = both / 2
        return F.linear(both, self.out_proj.weight, self.out_proj.bias)


class Block(nn.Module):
    """Add -> norm -> mixer with the fused add + RMSNorm; returns (mixer output, residual)."""

    def __init__(self, dim, mixer_cls, norm_cls, residual_in_fp32=True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer_cls(dim)
        self.norm = norm_cls(dim)
        self.drop_path = nn.Identity()

    def forward(self, hidden_states, residual=None, inference_params=None):
        hidden_states, residual = rms_norm_fn(
            hidden_states if residual is None else self.drop_path(hidden_states), self.norm.weight,
            self.norm.bias, residual=residual, prenorm=True, residual_in_fp32=self.residual_in_fp32,
            eps=self.norm.eps)
        return self.mixer(hidden_states, inference_params=inference_params), residual


class VisionMamba(nn.Module):
    """The released ViM: patch embedding, class token in the middle, absolute position embedding,
    `depth` blocks, a final fused add + RMSNorm, the class token through the head."""

    def __init__(self, img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192, d_state=16,
                 channels=3, num_classes=1000, norm_epsilon=1e-5, residual_in_fp32=True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.num_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, channels, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        mixer_cls = partial(Mamba, d_state=d_state, if_devide_out=True)
        norm_cls = partial(RMSNorm, eps=norm_epsilon)
        self.layers = nn.ModuleList(Block(embed_dim, mixer_cls, norm_cls, residual_in_fp32) for _ in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.drop_path = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x, inference_params=None):
        x = self.patch_embed(x)
        B, M, _ = x.shape
        cls_token = self.cls_token.expand(B, -1, -1)
        token_position = M // 2
        x = torch.cat((x[:, :token_position, :], cls_token, x[:, token_position:, :]), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        residual, hidden_states = None, x
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
        hidden_states = rms_norm_fn(self.drop_path(hidden_states), self.norm_f.weight, self.norm_f.bias,
                                    eps=self.norm_f.eps, residual=residual, prenorm=False,
                                    residual_in_fp32=self.residual_in_fp32)
        return hidden_states[:, token_position, :]

    def forward(self, x, return_features=False, inference_params=None):
        x = self.forward_features(x, inference_params)
        return x if return_features else self.head(x)


def tiny(**overrides) -> VisionMamba:
    """A small config of the released architecture (img 32, patch 8 -> 16 patches + class token)."""
    config = dict(img_size=32, patch_size=8, stride=8, depth=4, embed_dim=32, d_state=4, num_classes=10)
    return VisionMamba(**{**config, **overrides})
