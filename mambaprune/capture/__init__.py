"""Capture: the user's model as one torch.export graph, every selective scan one node."""
from .capture import Capture, capture
from .inputs import as_tuple, first_sample, flat_inputs, infer_example_inputs, run_graph
from .scan_registry import known_entries, register_scan, unregister_scan

__all__ = ["Capture", "capture", "as_tuple", "first_sample", "flat_inputs", "infer_example_inputs", "run_graph",
           "known_entries", "register_scan", "unregister_scan"]
