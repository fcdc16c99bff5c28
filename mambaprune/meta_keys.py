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

# node.meta, torch.export: the modules whose calls made the node, outermost first, as
# {key: (path, class)}; read through module_of
MODULE_STACK = "nn_module_stack"


def module_of(node) -> str:
    """The path of the innermost module whose call made `node` ("<top level>" for the model's own forward)."""
    stack = node.meta.get(MODULE_STACK) or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path or "<top level>"
