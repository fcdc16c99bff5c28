"""The names under which the pipeline records facts in `node.meta`.

One module for all of them, so that a reader can see every fact the passes exchange, and who
writes it, in one place.
"""

# node.meta, written by the analysis (analysis/tokens): the token fact of the node's output
TOKENS = "mambaprune.tokens"
# node.meta, analysis: the constant permutation (np.ndarray) a token gather applies
PERMUTATION = "mambaprune.permutation"
# node.meta, analysis: a depthwise conv1d along the tokens, the left padding of its window
CONV_LEFT = "mambaprune.conv_left"
# node.meta, analysis: a slice that brings a padded conv1d output back to L tokens (the conv's name)
CONV_SLICE = "mambaprune.conv_slice"
# node.meta, planning (planning/flops.py): the MACs the node performed on the example inputs
FLOPS = "mambaprune.flops"
# node.meta, rewrite (rewrite/select.py): the site whose kept positions this node computes
KEPT_POSITIONS = "mambaprune.kept_positions"
