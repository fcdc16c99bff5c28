"""Vision Mamba (ViM-T/S/B), as hustvl/Vim ``vim_{tiny,small,base}_patch16_224_bimambav2_final_pool_mean_
abs_pos_embed_with_midclstok_div2``, in plain PyTorch on ``mambaprune.runtime.selective_scan``.

Structure (what their forward does with these flags):

- patch embed (conv 16x16/16), a class token inserted in the MIDDLE of the patch sequence at index
  M = num_patches // 2, absolute position embedding;
- 24 blocks with a separate residual stream: ``residual = hidden + residual`` (``residual = hidden``
  in the first block), ``hidden = mixer(RMSNorm(residual))``;
- mixer "bimamba v2": in_proj -> xz (B, 2E, L); the forward direction runs conv1d (causal,
  depthwise, d_conv 4) -> SiLU -> x_proj -> dt_proj (weight only) -> selective scan (delta_bias =
  dt_proj.bias, softplus, gate z fused); the backward direction is the same with its own conv1d_b,
  x_proj_b, dt_proj_b, A_b_log, D_b applied to ``xz.flip(-1)``, its output flipped back; the two are
  summed, divided by 2 ("div2") and go through out_proj;
- final: ``residual = hidden + residual``, RMSNorm ``norm_f``, readout = the class token
  ``hidden[:, M]`` (with if_cls_token=True their forward returns the class token; the
  "final_pool_mean" in the name is never reached), Linear head.

Parameter names follow hustvl/Vim. Dropout / drop-path are omitted (inference only). No pretrained
weights exist offline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune.runtime import selective_scan

from ._registry import register_model
from .layers import (
    PatchEmbed,
    RMSNorm,
    causal_conv1d,
    depthwise_causal_conv1d,
    dt_rank_for,
    init_dt_proj_,
    s4d_real_A_log,
    trunc_normal_,
)


class BiMambaV2(nn.Module):
    """Bidirectional Mamba mixer (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank_for(d_model)
        E, R, N = self.d_inner, self.dt_rank, d_state
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        for sfx in ("", "_b"):
            setattr(self, "conv1d" + sfx, depthwise_causal_conv1d(E, d_conv))
            setattr(self, "x_proj" + sfx, nn.Linear(E, R + 2 * N, bias=False))
            dt_proj = nn.Linear(R, E, bias=True)
            init_dt_proj_(dt_proj, R)
            setattr(self, "dt_proj" + sfx, dt_proj)
        self.A_log = s4d_real_A_log(E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = s4d_real_A_log(E, N)
        self.D_b = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def _direction(self, xz, conv1d, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each
        x = F.silu(causal_conv1d(x, conv1d))
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, E, L); bias goes in as delta_bias
        A = -torch.exp(A_log.float())
        return selective_scan(
            x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D.float(),
            z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        y_f = self._direction(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._direction(xz.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        y = (y_f + y_b.flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))


class VimBlock(nn.Module):
    """Add -> RMSNorm -> mixer; returns (hidden, residual)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, eps: float = 1e-5):
        super().__init__()
        self.mixer = BiMambaV2(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.norm = RMSNorm(dim, eps=eps)

    def forward(self, hidden: torch.Tensor, residual=None):
        residual = hidden if residual is None else residual + hidden
        return self.mixer(self.norm(residual)), residual


class VisionMamba(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192,
                 depth=24, d_state=16, d_conv=4, expand=2, norm_eps=1e-5, block=None):
        """`block`: a callable making one block (default: a ``VimBlock`` of these sizes; VisionMamba2 gives
        its Mamba-2 block)."""
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.patch_embed.img_size
        num_patches = self.patch_embed.num_patches
        self.token_position = num_patches // 2  # index of the middle class token
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, embed_dim)))
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_patches + 1, embed_dim)))
        block = block or (lambda: VimBlock(embed_dim, d_state, d_conv, expand, norm_eps))
        self.layers = nn.ModuleList(block() for _ in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token inserted at ``token_position``, plus the position embedding."""
        x = self.patch_embed(x)
        M = self.token_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((x[:, :M], cls, x[:, M:]), dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        M = self.token_position
        hidden, residual = self.embed_tokens(x), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden = self.norm_f(residual + hidden)
        return hidden[:, M]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _vim(default_embed_dim: int, **overrides) -> VisionMamba:
    cfg = dict(img_size=224, patch_size=16, embed_dim=default_embed_dim, depth=24, d_state=16)
    cfg.update(overrides)
    return VisionMamba(**cfg)


@register_model
def vim_t(**overrides) -> VisionMamba:
    return _vim(192, **overrides)


@register_model
def vim_s(**overrides) -> VisionMamba:
    return _vim(384, **overrides)


@register_model
def vim_b(**overrides) -> VisionMamba:
    return _vim(768, **overrides)
