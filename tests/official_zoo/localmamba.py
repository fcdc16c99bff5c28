"""LocalVim (LocalMamba, Huang et al. 2024; hunto/LocalMamba `classification/lib/models/local_vim.py`,
`mamba/multi_mamba.py`, `mamba/local_scan.py`, `mamba/rope.py`), reproduced for tests.

Our own code, in their style and with their module names: `VisionMamba` with `MultiMamba` mixers, each
layer scanning the tokens along its own searched set of four directions (`MultiScan`: 'h', 'h_flip',
'v', 'v_flip', 'wK', 'wK_flip', the last two a window-by-window order of K x K windows), one
conv1d / x_proj / dt_proj / A_log / D set per direction, each through `mamba_inner_fn_no_out_proj`
(mamba_ssm), the outputs put back in raster order, gated by the channel attention `BiAttn` (a
token mean), summed (`torch.stack(xs).sum(0)`), then out_proj. Their local scans are autograd
Functions around a Triton kernel (`LocalScanTriton` / `LocalReverseTriton`); on a CPU we write their
forward with the view / permute of their own PyTorch `local_scan`, inside the same autograd Functions.
The released model adds 2-D rotary embeddings to hidden states and residual before every layer
(`if_rope`, `if_rope_residual`), an absolute position embedding, fused add + RMSNorm, mean pooling.
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

PAPER = "LocalMamba: Visual State Space Model with Windowed Selective Scan (arXiv 2403.09338)"
REPO = "hunto/LocalMamba"


# -- mamba/local_scan.py ------------------------------------------------------------------------
class LocalScanTriton(torch.autograd.Function):
    """(B, C, L) raster -> (B, C, L) window by window (K x K windows, row-major inside), flipped if asked."""

    @staticmethod
    def forward(ctx, x, K, flip, H=None, W=None):
        B, C, _ = x.shape
        x = x.view(B, C, H // K, K, W // K, K).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H * W)
        return x.flip([-1]) if flip else x

    @staticmethod
    def backward(ctx, y):
        raise NotImplementedError("inference only in tests")


class LocalReverseTriton(torch.autograd.Function):
    """The inverse of LocalScanTriton: window order back to raster order."""

    @staticmethod
    def forward(ctx, x, K, flip, H=None, W=None):
        B, C, _ = x.shape
        if flip:
            x = x.flip([-1])
        return x.view(B, C, H // K, W // K, K, K).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H * W)

    @staticmethod
    def backward(ctx, y):
        raise NotImplementedError("inference only in tests")


# -- mamba/multi_mamba.py -----------------------------------------------------------------------
class MultiScan(nn.Module):
    ALL_CHOICES = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")

    def __init__(self, dim, choices=None, token_size=(14, 14)):
        super().__init__()
        self.token_size = token_size
        self.choices = choices
        self.search = False

    def forward(self, xs):
        return torch.stack(xs).sum(0)

    def multi_scan(self, x):
        return [self.scan(x, direction) for direction in self.choices]

    def multi_reverse(self, xs):
        return [self.reverse(x, direction) for x, direction in zip(xs, self.choices)]

    def scan(self, x, direction="h"):
        """(B, L, D) -> (B, D, L) along `direction`."""
        H, W = self.token_size
        if direction == "h":
            return x.transpose(-2, -1)
        if direction == "h_flip":
            return x.transpose(-2, -1).flip([-1])
        if direction == "v":
            return rearrange(x, "b (h w) d -> b d (w h)", h=H, w=W)
        if direction == "v_flip":
            return rearrange(x, "b (h w) d -> b d (w h)", h=H, w=W).flip([-1])
        K = int(direction[1:].split("_")[0])
        return LocalScanTriton.apply(x.transpose(-2, -1), K, direction.endswith("flip"), H, W)

    def reverse(self, x, direction="h"):
        H, W = self.token_size
        if direction == "h":
            return x
        if direction == "h_flip":
            return x.flip([-1])
        if direction == "v":
            return rearrange(x, "b d (h w) -> b d (w h)", h=H, w=W)
        if direction == "v_flip":
            return rearrange(x.flip([-1]), "b d (h w) -> b d (w h)", h=H, w=W)
        K = int(direction[1:].split("_")[0])
        return LocalReverseTriton.apply(x, K, direction.endswith("flip"), H, W)


class BiAttn(nn.Module):
    def __init__(self, in_channels, act_ratio=0.125):
        super().__init__()
        reduce_channels = int(in_channels * act_ratio)
        self.norm = nn.LayerNorm(in_channels)
        self.global_reduce = nn.Linear(in_channels, reduce_channels)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduce_channels, in_channels)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x):
        ori_x = x
        x = self.norm(x)
        x_global = self.act_fn(self.global_reduce(x.mean(1, keepdim=True)))
        return ori_x * self.gate_fn(self.channel_select(x_global))


class MultiMamba(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 conv_bias=True, bias=False, layer_idx=None, bimamba_type="v2", directions=None, token_size=(14, 14)):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.multi_scan = MultiScan(self.d_inner, choices=directions, token_size=token_size)
        A_log = torch.log(repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner))
        for i in range(len(self.multi_scan.choices)):
            setattr(self, f"A_log_{i}", nn.Parameter(A_log.clone()))
            setattr(self, f"conv1d_{i}", nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                   padding=d_conv - 1, bias=conv_bias))
            setattr(self, f"x_proj_{i}", nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            std = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            with torch.no_grad():
                dt = dt.clamp(min=dt_init_floor)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            setattr(self, f"dt_proj_{i}", dt_proj)
            setattr(self, f"D_{i}", nn.Parameter(torch.ones(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.attn = BiAttn(self.d_inner)

    def forward(self, hidden_states, inference_params=None):
        xz = self.in_proj(hidden_states)
        xs = self.multi_scan.multi_scan(xz)
        outs = []
        for i, xz in enumerate(xs):
            A = -torch.exp(getattr(self, f"A_log_{i}").float())
            conv1d, x_proj = getattr(self, f"conv1d_{i}"), getattr(self, f"x_proj_{i}")
            dt_proj, D = getattr(self, f"dt_proj_{i}"), getattr(self, f"D_{i}")
            outs.append(mamba_inner_fn_no_out_proj(xz, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, A,
                                                   None, None, D, delta_bias=dt_proj.bias.float(),
                                                   delta_softplus=True))
        outs = self.multi_scan.multi_reverse(outs)
        outs = [self.attn(rearrange(out, "b d l -> b l d")) for out in outs]
        out = self.multi_scan(outs)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)


# -- mamba/rope.py ------------------------------------------------------------------------------
def broadcat(tensors, dim=-1):
    shape = [max(s) for s in zip(*(t.shape for t in tensors))]
    shape[dim] = -1
    return torch.cat([t.expand(*[s if i != (dim % len(shape)) else t.shape[i] for i, s in enumerate(shape)])
                      for t in tensors], dim=dim)


def rotate_half(x):
    x = rearrange(x, "... (d r) -> ... d r", r=2)
    x1, x2 = x.unbind(dim=-1)
    x = torch.stack((-x2, x1), dim=-1)
    return rearrange(x, "... d r -> ... (d r)")


class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim, pt_seq_len=16, ft_seq_len=None, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
        ft_seq_len = ft_seq_len or pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = repeat(torch.einsum("..., f -> ... f", t, freqs), "... n -> ... (n r)", r=2)
        freqs = broadcat((freqs[:, None, :], freqs[None, :, :]), dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t, freqs_cos=None, freqs_sin=None):
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


# -- local_vim.py -------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """timm's PatchEmbed (flatten, no norm)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
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
    def __init__(self, img_size=224, patch_size=16, depth=20, embed_dim=192, d_state=16, channels=3,
                 num_classes=1000, norm_epsilon=1e-5, residual_in_fp32=True, pt_hw_seq_len=14, directions=None):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, channels, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.token_size = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)
        self.rope = VisionRotaryEmbeddingFast(dim=embed_dim // 2, pt_seq_len=pt_hw_seq_len,
                                              ft_seq_len=img_size // patch_size)
        self.head = nn.Linear(embed_dim, num_classes)
        mixer = partial(MultiMamba, d_state=d_state, bimamba_type="v2", token_size=self.token_size)
        self.layers = nn.ModuleList(
            Block(embed_dim, partial(mixer, layer_idx=i, directions=directions[i]), partial(RMSNorm, eps=norm_epsilon),
                  residual_in_fp32) for i in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.drop_path = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x, inference_params=None):
        x = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed)
        residual, hidden_states = None, x
        for layer in self.layers:
            hidden_states = self.rope(hidden_states)
            if residual is not None:
                residual = self.rope(residual)
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
        hidden_states = rms_norm_fn(self.drop_path(hidden_states), self.norm_f.weight, self.norm_f.bias,
                                    eps=self.norm_f.eps, residual=residual, prenorm=False,
                                    residual_in_fp32=self.residual_in_fp32)
        return hidden_states.mean(dim=1)          # final_pool_type='mean'

    def forward(self, x, return_features=False, inference_params=None):
        x = self.forward_features(x, inference_params)
        return x if return_features else self.head(x)


def tiny(**overrides):
    """local_vim_tiny's structure (searched directions, 2x2 windows standing in for 7x7 on a 4x4 grid)."""
    directions = (["h", "v_flip", "w2", "w2_flip"], ["h_flip", "w2_flip", "v", "h"], ["h", "h_flip", "v", "w2"],
                  ["v", "v_flip", "w2", "w2_flip"])
    config = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10, pt_hw_seq_len=4,
                  directions=directions)
    return VisionMamba(**{**config, **overrides})
