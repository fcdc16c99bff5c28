"""Mamba as transformers runs it without CUDA kernels (huggingface/transformers
`models/mamba/modeling_mamba.py`: `MambaMixer.slow_forward`, `MambaRMSNorm`, `MambaBlock`), on image
patches, reproduced for tests.

Our own code, in their style and with their names: `MambaMixer` (in_proj to hidden_states and gate,
a causal depthwise conv1d cut to seq_len, x_proj to time_step / B / C, dt_proj + softplus, then the
discretisation `discrete_A = exp(A[None, :, None, :] * discrete_time_step[:, :, :, None])`,
`deltaB_u` and the recurrence as a Python loop over the tokens:
`ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]`, read out with
`torch.matmul(ssm_state.to(dtype), C[:, i, :].unsqueeze(-1))`, the outputs stacked), `MambaBlock`
(pre-norm residual, the residual kept in fp32 as `residual_in_fp32` does), `norm_f`. The image is cut
into patches by a strided conv and classified from the mean of the final tokens: how a vision model
built on `MambaModel(inputs_embeds=...)` runs. No scan function exists to route: the loop is all
there is (capture/token_loops.py lifts it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

PAPER = "Mamba: Linear-Time Sequence Modeling with Selective State Spaces (arXiv 2312.00752), transformers' slow path"
REPO = "huggingface/transformers"


@dataclass
class MambaConfig:
    hidden_size: int = 32
    state_size: int = 8
    expand: int = 2
    conv_kernel: int = 4
    num_hidden_layers: int = 4
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_rank: int = 0
    residual_in_fp32: bool = True

    @property
    def intermediate_size(self):
        return self.expand * self.hidden_size

    def __post_init__(self):
        self.time_step_rank = self.time_step_rank or math.ceil(self.hidden_size / 16)


class MambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MambaMixer(nn.Module):
    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.intermediate_size = config.intermediate_size
        self.time_step_rank = int(config.time_step_rank)
        self.layer_idx = layer_idx
        self.conv1d = nn.Conv1d(self.intermediate_size, self.intermediate_size, bias=config.use_conv_bias,
                                kernel_size=config.conv_kernel, groups=self.intermediate_size,
                                padding=config.conv_kernel - 1)
        self.act = nn.SiLU()
        self.in_proj = nn.Linear(self.hidden_size, self.intermediate_size * 2, bias=config.use_bias)
        self.x_proj = nn.Linear(self.intermediate_size, self.time_step_rank + self.ssm_state_size * 2, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32)[None, :]
        A = A.expand(self.intermediate_size, -1).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    def slow_forward(self, input_states):
        batch_size, seq_len, _ = input_states.shape
        dtype = input_states.dtype
        # 1. Gated MLP's linear projection
        projected_states = self.in_proj(input_states).transpose(1, 2)
        hidden_states, gate = projected_states.chunk(2, dim=1)
        # 2. Convolution sequence transformation
        ssm_state = torch.zeros((batch_size, self.intermediate_size, self.ssm_state_size),
                                device=hidden_states.device, dtype=dtype)
        hidden_states = self.act(self.conv1d(hidden_states)[..., :seq_len])
        # 3. State Space Model sequence transformation
        ssm_parameters = self.x_proj(hidden_states.transpose(1, 2))
        time_step, B, C = torch.split(ssm_parameters, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size],
                                      dim=-1)
        discrete_time_step = self.dt_proj(time_step)
        discrete_time_step = nn.functional.softplus(discrete_time_step).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        discrete_A = torch.exp(A[None, :, None, :] * discrete_time_step[:, :, :, None])
        discrete_B = discrete_time_step[:, :, :, None] * B[:, None, :, :].float()
        deltaB_u = discrete_B * hidden_states[:, :, :, None].float()
        scan_outputs = []
        for i in range(seq_len):
            ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]
            scan_output = torch.matmul(ssm_state.to(dtype), C[:, i, :].unsqueeze(-1))
            scan_outputs.append(scan_output[:, :, 0])
        scan_output = torch.stack(scan_outputs, dim=-1)
        scan_output = scan_output + (hidden_states * self.D[None, :, None])
        scan_output = (scan_output * self.act(gate))
        # 4. Final linear projection
        return self.out_proj(scan_output.transpose(1, 2))

    def forward(self, hidden_states):
        return self.slow_forward(hidden_states)


class MambaBlock(nn.Module):
    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaMixer(config, layer_idx=layer_idx)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states)
        return residual + hidden_states


class MambaModel(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.layers = nn.ModuleList([MambaBlock(config, layer_idx=idx) for idx in range(config.num_hidden_layers)])
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, inputs_embeds):
        hidden_states = inputs_embeds
        for mixer_block in self.layers:
            hidden_states = mixer_block(hidden_states)
        return self.norm_f(hidden_states)


class MambaForImageClassification(nn.Module):
    """Patches (a strided conv) -> MambaModel(inputs_embeds) -> mean over the tokens -> classifier."""

    def __init__(self, config: MambaConfig, img_size=32, patch_size=4, num_classes=10):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = nn.Conv2d(3, config.hidden_size, patch_size, patch_size)
        self.backbone = MambaModel(config)
        self.classifier = nn.Linear(config.hidden_size, num_classes)

    def forward(self, pixel_values):
        embeddings = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        hidden_states = self.backbone(inputs_embeds=embeddings)
        return self.classifier(hidden_states.mean(dim=1))


def tiny():
    """4 blocks, width 32, state 8, 32 x 32 images in 4 x 4 patches: 64 tokens, 64 unrolled steps per block."""
    return MambaForImageClassification(MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=4))
