"""The API: compile_pruned (prepare + build), what it returns (PrunedModel, its report) and recover."""
from .compile import Prepared, build, compile_pruned, prepare
from .pruned_model import PrunedModel
from .recover import recover
from .report import BlockReport, PruneReport, RecoveryRecord

__all__ = ["BlockReport", "Prepared", "PruneReport", "PrunedModel", "RecoveryRecord", "build",
           "compile_pruned", "prepare", "recover"]
