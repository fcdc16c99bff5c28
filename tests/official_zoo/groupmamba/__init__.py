"""GroupMamba (Shaker et al. 2024; Amshaker/GroupMamba `classification/models/groupmamba.py`, `ss2d.py`,
`csms6s.py`), reproduced for tests under their module names (csms6s / ss2d / groupmamba).

Our own code, in their style: a 4-stage model (`Stem`, `DownSamples`, `Block_mamba`, a final
`ClassBlock` on a mean token), whose mixer `GroupMambaLayer` splits the channels into four groups and
runs each through its own `SS2D` (VMamba's v2 forward, one direction per group: `CrossScan_1..4` /
`CrossMerge_1..4`, autograd Functions filling a `new_empty` tensor by slice assignment), then
channel affinity (a token mean through fc1 / fc2, sigmoid) and a projection. The selective scan is
`SelectiveScanCore.apply` (the compiled `selective_scan_cuda_core.fwd`; a CPU stand-in in tests),
reached through a closure inside `forward_corev2`, whose `SelectiveScan` argument is bound at
construction by `functools.partial(self.forward_corev2, ..., SelectiveScan=SelectiveScanCore)`.
"""
from . import csms6s, groupmamba, ss2d  # noqa: F401

PAPER = "GroupMamba: Efficient Group-Based Visual State Space Model (arXiv 2407.13772)"
REPO = "Amshaker/GroupMamba"
tiny = groupmamba.tiny
# tiny(): every stage ends in a dense downsampling and the last stage has one block, so pruning its sites
# removes 0.220 of the FLOPs at most; the checks run at 0.2
RATIO = 0.2
