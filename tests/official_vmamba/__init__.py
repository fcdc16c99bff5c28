"""VMamba as MzeroMiko/VMamba writes it (classification/models/{csms6s, csm_triton, vmamba}.py).

Our own code, written to compute what the official code computes, with its module, class,
function, parameter and config names (so its checkpoints' keys and its entry points are the
official ones): the scan reached through `csms6s.selective_scan_fn` (CUDA autograd Function
`SelectiveScanCuda`, pure-torch fallback `selective_scan_torch`), the cross-scan built by
allocation + slice assignment inside the autograd Functions `CrossScanF` / `CrossMergeF` and
wrapped in `torch.cuda.device(x.device)` (which is why the dense model cannot run on a CPU),
`SS2D` with the v0 path (cat + flip, einsum x_proj, channels-last) and the v2 family
(v05_noz as released: conv1d x_proj, no z, channels-first LayerNorm2d). Not part of the library.
"""
