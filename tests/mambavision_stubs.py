"""Just enough of timm and mamba_ssm for the real `mambavision` package to import on a CPU.

mambavision (NVlabs, on the registry) imports timm's layers and registry and mamba_ssm's CUDA
`selective_scan_fn`. Neither is installed here (mamba_ssm needs CUDA to build), so the real
package is installed with `--no-deps` and these stand-ins are put in `sys.modules` first, only for
the modules that do not import. Only what mambavision's model file uses is stubbed; the model code
itself is the package's own.
"""
from __future__ import annotations

import importlib
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm's reference semantics, one token at a time (u, delta: (B, D, L); B, C: (B, N, L))."""
    delta = delta + delta_bias[..., None] if delta_bias is not None else delta
    delta = F.softplus(delta) if delta_softplus else delta
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    y = y + u * D[:, None] if D is not None else y
    return y * F.silu(z) if z is not None else y


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x    # mambavision is only run in eval mode here


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0, **kwargs):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean, std, a, b)


class _Cfg(dict):
    def to_dict(self):
        return dict(self)


def resolve_pretrained_cfg(name, *args, **kwargs):
    return _Cfg(architecture=name, url="", input_size=(3, 224, 224))


def update_args(cfg, kwargs, kwargs_filter=None):
    return None


def register_model(fn):
    return fn


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def install() -> None:
    """Put the stand-ins in sys.modules for timm / mamba_ssm when they do not import."""
    if not _importable("timm"):
        layers = _module("timm.models.layers", DropPath=DropPath, LayerNorm2d=LayerNorm2d, trunc_normal_=trunc_normal_)
        modules = {
            "timm": _module("timm"),
            "timm.models": _module("timm.models"),
            "timm.models.layers": layers,
            "timm.models.registry": _module("timm.models.registry", register_model=register_model),
            "timm.models._builder": _module("timm.models._builder", resolve_pretrained_cfg=resolve_pretrained_cfg,
                                            _update_default_kwargs=update_args),
            "timm.models.vision_transformer": _module("timm.models.vision_transformer", Mlp=Mlp, PatchEmbed=None),
        }
        sys.modules.update(modules)
    if not _importable("mamba_ssm.ops.selective_scan_interface"):
        interface = _module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=selective_scan_fn)
        sys.modules.update({"mamba_ssm": _module("mamba_ssm"), "mamba_ssm.ops": _module("mamba_ssm.ops"),
                            "mamba_ssm.ops.selective_scan_interface": interface})


