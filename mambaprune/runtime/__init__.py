"""Runtime ops of mambaprune: the selective scan (Mamba-1), the SSD scan (Mamba-2) and the
position-aware token ops.

Importing this package registers the ``mambaprune::`` custom ops (fake kernels, autograd, FLOP
formulas) so torch.export, torch.compile and FlopCounterMode know them. On the CPU their fast paths
are C++ kernels built on first use (``cpu_kernels_status()`` says whether they are in use, and why
not); ``chosen_scan_impl(u)`` says which scan implementation runs for u.
"""

from .cpu_kernels import cpu_kernels_status
from .scan_reference import selective_scan_reference
from .scan_triton import selective_scan_triton, triton_available
from .selective_scan import chosen_scan_impl, selective_scan, selective_scan_macs
from .ssd_reference import ssd_scan_reference
from .ssd_scan import chosen_ssd_impl, ssd_scan, ssd_scan_macs
from .token_ops import gather_tokens, path_order, pos_conv1d, pos_conv2d, scatter_tokens

__all__ = [
    "chosen_scan_impl",
    "chosen_ssd_impl",
    "cpu_kernels_status",
    "gather_tokens",
    "path_order",
    "pos_conv1d",
    "pos_conv2d",
    "scatter_tokens",
    "selective_scan",
    "selective_scan_macs",
    "selective_scan_reference",
    "selective_scan_triton",
    "ssd_scan",
    "ssd_scan_macs",
    "ssd_scan_reference",
    "triton_available",
]
