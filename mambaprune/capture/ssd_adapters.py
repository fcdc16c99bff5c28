"""Adapters from Mamba-2 (SSD) entry points to `mambaprune::ssd_scan`.

Each adapter has the signature of the function it replaces and computes the same value with our op:

- mamba_ssm's `mamba_chunk_scan_combined` (the chunked scan itself);
- mamba_ssm's `mamba_split_conv1d_scan_combined` (the fused Mamba2 path), routed to its parts: the
  split of `zxbcdt`, the depthwise causal conv1d + SiLU, the scan, the gated RMSNorm (per group of
  B/C, before or after the gate) and the output projection, as its reference
  `mamba_split_conv1d_scan_ref` computes them;
- the pure-PyTorch chunked SSD `ssd_minimal_discrete(X, A, B, C, block_len)` of mamba_ssm's
  `modules/ssd_minimal.py`, whose inputs are already discretised (X = x * dt, A = A * dt per token
  and head): it is the scan with step size -A and unit decay rate, on x = X / -A (exact where
  A * dt < 0, as Mamba-2's A = -exp(A_log) and dt = softplus(.) make it); its final state is not
  captured (a use of it is refused);
- `causal_conv1d_fn` (package causal_conv1d, CUDA only), the conv of mamba_ssm's Mamba2 split path:
  the depthwise causal conv1d it computes, so the conv's token neighbourhood is seen as such;
- HF transformers `Mamba2Mixer.torch_forward` (the mixer's pure-PyTorch chunked path), replaced by
  the same mixer on our op.

`selective_state_update` (a one-token decoding step that updates a cache in place) is routed to a
refusal: a vision model that runs its scan as per-token state updates has no scan over the tokens
for the compiler to prune.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..runtime import ssd_scan

_NO_LIMIT = (0.0, float("inf"))


def _refuse(function: str, **options) -> None:
    used = [name for name, value in options.items() if value is not None and value is not False]
    if used:
        raise UnsupportedModelError(
            f"mambaprune cannot capture {function} with {', '.join(used)}: mambaprune::ssd_scan scans whole "
            "sequences from a zero state and returns their outputs only. Capture the model without inference "
            "caches, initial states or packed sequences.")


def _scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit):
    """ssd_scan with mamba_ssm's dt_limit (a clamp after the bias and softplus): the step is then
    computed here and passed without bias or softplus."""
    if A.dim() != 1:
        raise UnsupportedModelError(f"an SSD scan with A of shape {tuple(A.shape)} is not understood: "
                                    "mambaprune::ssd_scan takes one A per head, of shape (heads,)")
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
        dt = (F.softplus(dt) if dt_softplus else dt).clamp(min=dt_limit[0], max=dt_limit[1])
        dt_bias, dt_softplus = None, False
    return ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus)


# -- mamba_ssm.ops.triton.ssd_combined -------------------------------------------------------------
def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=_NO_LIMIT,
                              return_final_states=False, return_varlen_states=False):
    _refuse("mamba_chunk_scan_combined", initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
            return_final_states=return_final_states, return_varlen_states=return_varlen_states)
    return _scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)


def gated_rms_norm(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba_ssm's gated RMSNorm (layernorm_gated.rms_norm_ref): x * silu(z) before the norm (or the
    norm's output times silu(z) after it), normalised over groups of `group_size` channels, in fp32."""
    dtype, x = x.dtype, x.float()
    gate = None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        x = x * gate
    size = group_size or x.shape[-1]
    grouped = x.unflatten(-1, (x.shape[-1] // size, size))
    out = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(dtype)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=_NO_LIMIT,
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    _refuse("mamba_split_conv1d_scan_combined", initial_states=initial_states, seq_idx=seq_idx,
            return_final_states=return_final_states)
    nheads, headdim = (D.shape[0], headdim) if D.dim() == 1 else tuple(D.shape)
    batch, length, _ = zxbcdt.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    width = conv1d_weight.shape[-1]
    xBC = F.conv1d(xBC.transpose(1, 2), conv1d_weight.reshape(xBC.shape[-1], 1, width), conv1d_bias,
                   padding=width - 1, groups=xBC.shape[-1])[..., :length].transpose(1, 2)
    if activation in ("silu", "swish"):
        xBC = F.silu(xBC)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, length, nheads, headdim)
    B, C = (t.reshape(batch, length, ngroups, dstate) for t in (B, C))
    if rmsnorm_weight is None:
        y = _scan(x, dt, A, B, C, D, z.reshape(batch, length, nheads, headdim), dt_bias, True, dt_limit)
        y = y.reshape(batch, length, dim)
    else:
        y = _scan(x, dt, A, B, C, D, None, dt_bias, True, dt_limit).reshape(batch, length, dim)
        y = gated_rms_norm(y, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return y if outproj_weight is None else F.linear(y, outproj_weight, outproj_bias)


# -- causal_conv1d (the conv of Mamba2's split path) ------------------------------------------------
def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Depthwise causal conv1d over (batch, dim, L) with weight (dim, width), then SiLU if asked."""
    _refuse("causal_conv1d_fn", seq_idx=seq_idx, initial_states=initial_states,
            return_final_states=return_final_states, final_states_out=final_states_out)
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


# -- mamba_ssm.ops.triton.selective_state_update ----------------------------------------------------
def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           *args, **kwargs):
    raise UnsupportedModelError(
        "selective_state_update was called while capturing the model: it is a one-token decoding step that "
        "updates a cached state in place, so the model has no scan over its tokens for mambaprune to prune. "
        "Run the model's full-sequence path (mamba_chunk_scan_combined / mamba_split_conv1d_scan_combined, "
        "i.e. without inference_params), or declare a scan over the tokens with mambaprune.register_scan.")


# -- mamba_ssm.modules.ssd_minimal ------------------------------------------------------------------
def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """X (b, l, h, p) = x * dt; A (b, l, h) = A * dt; B, C (b, l, h, n): (Y, final state). The final
    state is not captured (a use of it raises UnsupportedModelError): computing it would read every
    token after the scan, and the minimal SSD's callers in vision models drop it (`y, _ = ...`)."""
    _refuse("ssd_minimal_discrete", initial_states=initial_states)
    return discrete_ssd(X, A, B, C), FinalStateNotCaptured("ssd_minimal_discrete")


def discrete_ssd(X, A, B, C):
    """The SSD of discretised inputs (X = x * dt, A = A * dt per token and head) with `mambaprune.ssd_scan`:
    the scan with step size -A and unit decay rate on x = X / -A (exact where A * dt < 0)."""
    step = -A
    rate = -torch.ones(A.shape[-1], dtype=torch.float32, device=A.device)
    return ssd_scan(X / step.unsqueeze(-1).to(X.dtype), step, rate, B, C)


class FinalStateNotCaptured:
    """Stands for a scan's final state that the capture does not compute: any use of it raises."""

    def __init__(self, function: str):
        object.__setattr__(self, "_function", function)

    def _refuse(self, *args, **kwargs):
        raise UnsupportedModelError(
            f"the model uses the final state returned by {self._function}: mambaprune::ssd_scan returns the "
            "outputs only, and a pruned model has no final state of the whole sequence. Use the outputs only "
            "(`y, _ = ...`), or declare the scan with mambaprune.register_scan.")

    def __getattr__(self, name):
        self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        next(a for a in args if isinstance(a, cls))._refuse()


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "matmul", "rmatmul", "truediv", "rtruediv", "getitem",
              "neg", "float", "bool", "len", "iter"):
    setattr(FinalStateNotCaptured, f"__{_name}__", FinalStateNotCaptured._refuse)


# -- transformers.models.mamba2.modeling_mamba2.Mamba2Mixer -----------------------------------------
def mamba2_mixer_torch_forward(self, input_states, cache_params=None, *args, attention_mask=None, **kwargs):
    """HF transformers' Mamba2Mixer.torch_forward (no cache) on mambaprune::ssd_scan."""
    _refuse("Mamba2Mixer.torch_forward", cache_params=cache_params)
    if args and isinstance(args[-1], torch.Tensor) and args[-1].dim() == 2 and attention_mask is None:
        attention_mask = args[-1]   # (..., cache_position, attention_mask) passed by position
    batch, length, _ = input_states.shape
    dtype = input_states.dtype
    if attention_mask is not None:
        input_states = (input_states * attention_mask[:, :, None]).to(dtype)
    projected = self.in_proj(input_states)
    groups_n = self.n_groups * self.ssm_state_size
    d_mlp = (projected.shape[-1] - 2 * self.intermediate_size - 2 * groups_n - self.num_heads) // 2
    _, _, gate, hidden, dt = projected.split([d_mlp, d_mlp, self.intermediate_size, self.conv_dim,
                                              self.num_heads], dim=-1)
    hidden = self.act(self.conv1d(hidden.transpose(1, 2))[..., :length].transpose(1, 2))
    if attention_mask is not None:
        hidden = (hidden * attention_mask[:, :, None]).to(hidden.dtype)
    x, B, C = torch.split(hidden, [self.intermediate_size, groups_n, groups_n], dim=-1)
    limit = _time_step_limit(self)
    y = _scan(x.reshape(batch, length, -1, self.head_dim), dt, -torch.exp(self.A_log.float()),
              B.reshape(batch, length, -1, self.ssm_state_size), C.reshape(batch, length, -1, self.ssm_state_size),
              self.D, None, self.dt_bias, True, limit)
    return self.out_proj(self.norm(y.reshape(batch, length, -1), gate).to(dtype))


def _time_step_limit(mixer) -> tuple:
    """The clamp of the step size after its softplus: (time_step_min, inf) in recent transformers,
    time_step_limit in older ones (their torch_forward clamps to it as well)."""
    if hasattr(mixer, "time_step_min"):
        return (float(mixer.time_step_min), float("inf"))
    return tuple(float(v) for v in getattr(mixer, "time_step_limit", _NO_LIMIT))


_SSD = "mamba_ssm.ops.triton.ssd_combined"
BUILTIN = [
    (_SSD, "mamba_chunk_scan_combined", mamba_chunk_scan_combined),
    (_SSD, "mamba_split_conv1d_scan_combined", mamba_split_conv1d_scan_combined),
    ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update", selective_state_update),
    ("causal_conv1d", "causal_conv1d_fn", causal_conv1d_fn),
    ("mamba_ssm.modules.ssd_minimal", "ssd_minimal_discrete", ssd_minimal_discrete),
    ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer.torch_forward", mamba2_mixer_torch_forward),
]
