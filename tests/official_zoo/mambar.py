"""Mamba(R), Vision Mamba with registers (Wang et al. 2024; wangf3014/Mamba-Reg `models_mamba.py`,
`mamba_custom.py`, `utils.py`), reproduced for tests.

Our own code, in their style and with their names: the ViM backbone (fused add + RMSNorm, residual in
fp32), `num_cls_tokens` registers spread evenly through the patch tokens by one constant gather
(`torch.cat([x, cls_token], 1)[:, self.token_idx]`, `get_cls_idx`), the registers read out at
`cls_positions`, reduced by a linear `neck` and normed when `cls_reduce > 1`. The mixer (`mamba_custom.Mamba`,
biscan) runs both directions through THEIR OWN `mamba_inner_fn_no_out_proj`: a vendored copy of ViM's
`MambaInnerFnCustom` autograd Function that calls the compiled extensions straight through
(`causal_conv1d_cuda.causal_conv1d_fwd`, `selective_scan_cuda.fwd`), not mamba_ssm's Python entry
points (tests put CPU stand-ins of the extensions in sys.modules: cuda_extensions.py).
"""
from __future__ import annotations

import math
from functools import partial

import causal_conv1d_cuda
import selective_scan_cuda
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from mamba_ssm.ops.triton.layernorm import RMSNorm, rms_norm_fn

PAPER = "Mamba-R: Vision Mamba ALSO Needs Registers (arXiv 2405.14858)"
REPO = "wangf3014/Mamba-Reg"


# -- utils.py -----------------------------------------------------------------------------------
def get_cls_idx(H, W, n_cls):
    """The gather that puts register i after every L = H*W // (n_cls + 1) patch tokens, and where they end up."""
    n_tokens = H * W
    L = n_tokens // (n_cls + 1)
    token_idx = torch.cat([torch.arange(L * n_cls).view(n_cls, -1),
                           torch.arange(n_tokens, n_tokens + n_cls).unsqueeze(-1)], dim=1).contiguous().view(-1)
    token_idx = torch.cat([token_idx, torch.arange(L * n_cls, n_tokens)])
    cls_pos = torch.arange(L, L * (n_cls + 1) + n_cls, L + 1)
    return token_idx, cls_pos


# -- mamba_custom.py ----------------------------------------------------------------------------
class MambaInnerFnCustom(torch.autograd.Function):
    """ViM's mamba inner function without out_proj, vendored: the extensions called directly."""

    @staticmethod
    def forward(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None, D=None,
                delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
        L = xz.shape[-1]
        delta_rank = delta_proj_weight.shape[1]
        d_state = A.shape[-1]
        conv1d_weight = rearrange(conv1d_weight, "d 1 w -> d w")
        x, z = xz.chunk(2, dim=1)
        conv1d_out = causal_conv1d_cuda.causal_conv1d_fwd(x, conv1d_weight, conv1d_bias, None, True)
        x_dbl = F.linear(rearrange(conv1d_out, "b d l -> (b l) d"), x_proj_weight)
        delta = rearrange(delta_proj_weight @ x_dbl[:, :delta_rank].t(), "d (b l) -> b d l", l=L)
        B = rearrange(x_dbl[:, delta_rank:delta_rank + d_state], "(b l) dstate -> b 1 dstate l", l=L).contiguous()
        C = rearrange(x_dbl[:, -d_state:], "(b l) dstate -> b 1 dstate l", l=L).contiguous()
        out, scan_intermediates, out_z = selective_scan_cuda.fwd(conv1d_out, delta, A, B, C, D, z, delta_bias,
                                                                 delta_softplus)
        return out_z

    @staticmethod
    def backward(ctx, dout):
        raise NotImplementedError("inference only in tests")


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None,
                               D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    return MambaInnerFnCustom.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D,
                                    delta_bias, B_proj_bias, C_proj_bias, delta_softplus)


class Mamba(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 conv_bias=True, bias=False, layer_idx=None, biscan=True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.biscan = biscan
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
        return F.linear(rearrange(out + out_b.flip([-1]), "b d l -> b l d") / 2, self.out_proj.weight,
                        self.out_proj.bias)


# -- models_mamba.py ----------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = ((img_size - patch_size) // patch_size + 1,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
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


class VisionMamba(nn.Module):
    def __init__(self, img_size=224, patch_size=16, depth=24, embed_dim=192, d_state=16, channels=3,
                 num_classes=1000, norm_epsilon=1e-5, residual_in_fp32=True, num_cls_tokens=12, cls_reduce=1):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.num_cls_tokens, self.cls_reduce = num_cls_tokens, cls_reduce
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim))
        H, W = self.patch_embed.grid_size
        self.token_idx, self.cls_positions = get_cls_idx(H, W, num_cls_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)
        if cls_reduce > 1:
            self.neck = nn.Linear(embed_dim, embed_dim // cls_reduce, bias=False)
            self.norm_neck = RMSNorm(embed_dim * num_cls_tokens // cls_reduce, eps=norm_epsilon)
        self.head = nn.Linear(embed_dim * (num_cls_tokens // cls_reduce), num_classes)
        mixer_cls = partial(Mamba, d_state=d_state, biscan=True)
        self.layers = nn.ModuleList(Block(embed_dim, partial(mixer_cls, layer_idx=i), partial(RMSNorm, eps=norm_epsilon),
                                          residual_in_fp32) for i in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.drop_path = nn.Identity()
        for p in (self.pos_embed, self.cls_token, self.pos_embed_cls):
            nn.init.trunc_normal_(p, std=0.02)

    def forward_features(self, x, inference_params=None):
        x = self.patch_embed(x)
        B, _, _ = x.shape
        x = self.pos_drop(x + self.pos_embed)
        cls_token = self.cls_token.expand(B, -1, -1) + self.pos_embed_cls
        x = torch.cat([x, cls_token], dim=1)[:, self.token_idx]
        residual, hidden_states = None, x
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
        hidden_states = rms_norm_fn(self.drop_path(hidden_states), self.norm_f.weight, self.norm_f.bias,
                                    eps=self.norm_f.eps, residual=residual, prenorm=False,
                                    residual_in_fp32=self.residual_in_fp32)
        if self.cls_reduce > 1:
            return self.norm_neck(self.neck(hidden_states[:, self.cls_positions]).view(B, -1))
        return hidden_states[:, self.cls_positions].view(B, -1)

    def forward(self, x, return_features=False, inference_params=None):
        x = self.forward_features(x, inference_params)
        return x if return_features else self.head(x)


def tiny(**overrides):
    """mambar_small's structure (registers, cls_reduce 2) at 16 patches and 4 registers."""
    config = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10, num_cls_tokens=4,
                  cls_reduce=2)
    return VisionMamba(**{**config, **overrides})
