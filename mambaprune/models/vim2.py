"""A reference vision Mamba-2: ViM's isotropic, bidirectional backbone with Mamba-2 (SSD) mixers.

Structure (ViM's, models/vim.py, with the mixer of mamba_ssm's ``Mamba2`` module):

- patch embed (conv p x p / p), a class token inserted in the MIDDLE of the patch sequence at
  M = num_patches // 2, absolute position embedding;
- blocks with a separate residual stream: ``residual = hidden + residual``, ``hidden =
  mixer(RMSNorm(residual))``;
- mixer: ``in_proj`` -> [z (E), xBC (E + 2 G N), dt (H)] per token (E = expand * d_model, H = E /
  headdim heads, G groups of B/C); the forward direction runs a depthwise causal conv1d (d_conv 4)
  + SiLU on xBC, splits it into x, B, C and runs the SSD scan (``mambaprune.ssd_scan``: scalar decay
  A_h = -exp(A_log_h), D per head, dt_bias, softplus); the backward direction does the same on the
  flipped sequence with its own conv1d_b, A_b_log, D_b, dt_bias_b, its output flipped back. The
  two are averaged, gated and normalised as Mamba-2 does (RMSNorm(y * silu(z))), then ``out_proj``;
- final: ``residual = hidden + residual``, RMSNorm ``norm_f``, readout ``hidden[:, M]``, Linear head.

Everything runs on the CPU (the op's C++ kernel) as on a GPU (its Triton kernel). Inference-only
simplifications as in vim.py: no dropout or drop-path.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune.runtime import ssd_scan

from ._registry import register_model
from .layers import RMSNorm, causal_conv1d, depthwise_causal_conv1d
from .vim import VisionMamba


def _dt_bias(heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> nn.Parameter:
    """Mamba-2's dt_bias: softplus(dt_bias) log-uniform in [dt_min, dt_max] (its inverse softplus)."""
    dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(1e-4)
    return nn.Parameter(dt + torch.log(-torch.expm1(-dt)))


def _A_log(heads: int) -> nn.Parameter:
    """Mamba-2's A_log: A = -exp(A_log) uniform in [1, 16]."""
    return nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))


class BiMamba2(nn.Module):
    """Bidirectional Mamba-2 mixer (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model = {self.d_inner} is not a multiple of headdim = {headdim}")
        self.d_state, self.headdim, self.ngroups = d_state, headdim, ngroups
        self.nheads = self.d_inner // headdim
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=False)
        for sfx in ("", "_b"):
            setattr(self, "conv1d" + sfx, depthwise_causal_conv1d(conv_dim, d_conv))
            setattr(self, "dt_bias" + sfx, _dt_bias(self.nheads))
            setattr(self, "A" + sfx + "_log", _A_log(self.nheads))
            setattr(self, "D" + sfx, nn.Parameter(torch.ones(self.nheads)))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _direction(self, xbc, dt, conv1d, dt_bias, A_log, D):
        """One direction's scan on xbc (B, L, conv_dim) and dt (B, L, H): y (B, L, E)."""
        batch, length, _ = xbc.shape
        xbc = F.silu(causal_conv1d(xbc.transpose(1, 2), conv1d)).transpose(1, 2)
        groups_n = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, groups_n, groups_n], dim=-1)
        y = ssd_scan(
            x.reshape(batch, length, self.nheads, self.headdim), dt, -torch.exp(A_log.float()),
            B.reshape(batch, length, self.ngroups, self.d_state), C.reshape(batch, length, self.ngroups, self.d_state),
            D.float(), dt_bias=dt_bias.float(), dt_softplus=True,
        )
        return y.reshape(batch, length, self.d_inner)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        z, xbc, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                                        self.nheads], dim=-1)
        y_f = self._direction(xbc, dt, self.conv1d, self.dt_bias, self.A_log, self.D)
        y_b = self._direction(xbc.flip(1), dt.flip(1), self.conv1d_b, self.dt_bias_b, self.A_b_log, self.D_b)
        y = (y_f + y_b.flip(1)) / 2
        return self.out_proj(self.norm(y * F.silu(z)))


class Vim2Block(nn.Module):
    """Add -> RMSNorm -> Mamba-2 mixer; returns (hidden, residual)."""

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int, headdim: int, ngroups: int, eps: float):
        super().__init__()
        self.mixer = BiMamba2(dim, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups)
        self.norm = RMSNorm(dim, eps=eps)

    def forward(self, hidden: torch.Tensor, residual=None):
        residual = hidden if residual is None else residual + hidden
        return self.mixer(self.norm(residual)), residual


class VisionMamba2(VisionMamba):
    """ViM's backbone (models/vim.py: embedding, middle class token, residual stream, readout) with
    Mamba-2 blocks."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=24,
                 d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, norm_eps=1e-5):
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depth, norm_eps=norm_eps,
                         block=lambda: Vim2Block(embed_dim, d_state, d_conv, expand, headdim, ngroups, norm_eps))


def _vim2(default_embed_dim: int, **overrides) -> VisionMamba2:
    cfg = dict(img_size=224, patch_size=16, embed_dim=default_embed_dim, depth=24, d_state=64, headdim=64)
    cfg.update(overrides)
    return VisionMamba2(**cfg)


@register_model
def vim2_t(**overrides) -> VisionMamba2:
    """ViM-T's shape (width 192, 24 blocks) with Mamba-2 mixers: 6 heads of 64, state 64."""
    return _vim2(192, **overrides)


@register_model
def vim2_s(**overrides) -> VisionMamba2:
    """ViM-S's shape (width 384, 24 blocks) with Mamba-2 mixers: 12 heads of 64, state 64."""
    return _vim2(384, **overrides)
