"""The API: compile_pruned (prepare + build) and what it returns (PrunedModel, its report)."""
from .compile import Prepared, build, compile_pruned, prepare
from .pruned_model import PrunedModel
from .report import BlockReport, PruneReport

__all__ = ["BlockReport", "Prepared", "PruneReport", "PrunedModel", "build", "compile_pruned", "prepare"]
