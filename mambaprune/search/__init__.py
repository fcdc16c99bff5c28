"""Search: schedule="auto" and alignment="auto", chosen on the user's calibration batches."""
from .alignment import AUTO_ALIGNMENT_CANDIDATES, AlignmentSearch, search_alignment
from .calibration import Calibration, calibration_inputs, output_discrepancy, plan_sites
from .schedule import ScheduleSearch, search_schedule

__all__ = ["AUTO_ALIGNMENT_CANDIDATES", "AlignmentSearch", "Calibration", "ScheduleSearch", "calibration_inputs",
           "output_discrepancy", "plan_sites", "search_alignment", "search_schedule"]
