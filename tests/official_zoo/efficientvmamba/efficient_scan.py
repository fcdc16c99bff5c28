"""EfficientVMamba's efficient_scan: skip-sampled cross-scan and its merge (inference only)."""
import math

import torch


class EfficientScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step_size=2):
        B, C, org_h, org_w = x.shape
        H, W = org_h // step_size, org_w // step_size
        xs = x.new_empty((B, 4, C, H * W))
        xs[:, 0] = x[:, :, ::step_size, ::step_size].contiguous().view(B, C, -1)
        xs[:, 1] = x.transpose(dim0=2, dim1=3)[:, :, ::step_size, 1::step_size].contiguous().view(B, C, -1)
        xs[:, 2] = x[:, :, ::step_size, 1::step_size].contiguous().view(B, C, -1)
        xs[:, 3] = x.transpose(dim0=2, dim1=3)[:, :, 1::step_size, 1::step_size].contiguous().view(B, C, -1)
        return xs.view(B, 4, C, -1)


class EfficientMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, ori_h, ori_w, step_size=2):
        B, K, C, L = ys.shape
        H, W = math.ceil(ori_h / step_size), math.ceil(ori_w / step_size)
        y = ys.new_empty((B, C, H * step_size, W * step_size))
        y[:, :, ::step_size, ::step_size] = ys[:, 0].reshape(B, C, H, W)
        y[:, :, 1::step_size, ::step_size] = ys[:, 1].reshape(B, C, W, H).transpose(dim0=2, dim1=3)
        y[:, :, ::step_size, 1::step_size] = ys[:, 2].reshape(B, C, H, W)
        y[:, :, 1::step_size, 1::step_size] = ys[:, 3].reshape(B, C, W, H).transpose(dim0=2, dim1=3)
        return y.view(B, C, -1)
