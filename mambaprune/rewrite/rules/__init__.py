"""The rewrite rules for the nodes of a pruned region, in the order the driver tries them."""
from .base import RewriteRule
from .conv1d import DropConvSlice, PositionConv1d
from .conv2d import NeighbourConv2d
from .default import CopyNode
from .permutation import ReorderTokens, leave_grid
from .dense_moves import RestoreBeforeMoving
from .readout import RemapReadout
from .scan_gaps import ScanGaps

REWRITE_RULES = (
    RemapReadout(),      # a constant-index read follows its token
    DropConvSlice(),     # the slice after a padded conv1d: pos_conv1d returns K tokens already
    PositionConv1d(),    # conv1d windows at the claimed positions
    ReorderTokens(),     # constant permutations: the original path restricted to the kept tokens
    RestoreBeforeMoving(),  # moves the kept tokens cannot follow run on the restored dense tensor
    NeighbourConv2d(),   # a conv2d that looks at neighbours runs on the scattered grid
    ScanGaps(),          # alignment="decay": the scan's state decays across the gaps
    CopyNode(),          # everything else, on arguments cut to the site
)

__all__ = ["REWRITE_RULES", "RewriteRule", "CopyNode", "DropConvSlice", "NeighbourConv2d", "PositionConv1d",
           "ReorderTokens", "RemapReadout", "RestoreBeforeMoving", "ScanGaps", "leave_grid"]
