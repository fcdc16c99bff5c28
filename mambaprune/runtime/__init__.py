"""Runtime ops of mambaprune: the selective scan and the position-aware token ops.

Importing this package registers the ``mambaprune::`` custom ops (fake kernels, autograd, FLOP
formulas) so torch.export, torch.compile and FlopCounterMode know them.
"""

from .scan_reference import selective_scan_reference
from .scan_triton import selective_scan_triton, triton_available
from .selective_scan import chosen_scan_impl, selective_scan, selective_scan_macs
from .token_ops import gather_tokens, path_order, pos_conv1d, pos_conv2d, scatter_tokens

__all__ = [
    "chosen_scan_impl",
    "gather_tokens",
    "path_order",
    "pos_conv1d",
    "pos_conv2d",
    "scatter_tokens",
    "selective_scan",
    "selective_scan_macs",
    "selective_scan_reference",
    "selective_scan_triton",
    "triton_available",
]
