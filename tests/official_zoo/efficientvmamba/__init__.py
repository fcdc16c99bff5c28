"""EfficientVMamba (Pei et al. 2024; TerryPei/EfficientVMamba `classification/lib/models/mamba/efficient_mamba.py`,
`efficient_scan.py`), reproduced for tests under their module names.

Our own code, in their style: the efficient 2-D scan `ES2D` (their `SS2D` with `step_size=2`): an
atrous "skip sampling" `EfficientScan` that splits the grid into four interleaved sub-grids
(`x[:, :, ::2, ::2]`, the transpose's `[::2, 1::2]`, ...; an autograd Function filling a `new_empty`
tensor by slice assignment), one scan per sub-grid (grouped B / C), `EfficientMerge` writing them back
into the grid, an output LayerNorm, the gate; the scan is their own autograd Function `SelectiveScan`
calling the compiled `selective_scan_cuda_core.fwd` (a CPU stand-in in tests) through a closure.
Reproduced: the VSS stages (blocks with ES2D, `PatchMerging2D` between stages), classifier head.
Not reproduced: the convolutional `InvertedResidual` fusion branch of their later stages.
"""
from . import efficient_mamba, efficient_scan  # noqa: F401

PAPER = "EfficientVMamba: Atrous Selective Scan for Light Weight Visual Mamba (arXiv 2403.09977)"
REPO = "TerryPei/EfficientVMamba"
tiny = efficient_mamba.tiny
