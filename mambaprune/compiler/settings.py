"""The one settings object carried through the pipeline (validated once, at the API boundary)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Union

from ..runtime.token_index import METRICS

# chosen from benchmarks/fidelity.py (README, "Fidelity")
DEFAULT_METRIC = "novelty"

ALIGNMENTS = ("none", "none-unsorted", "hold", "decay")
# what compile_pruned accepts: a concrete alignment, or "auto" (chosen on calibration batches)
ALIGNMENT_CHOICES = ALIGNMENTS + ("auto",)
# how a hierarchical model's pruned grid is filled before the downsampling that ends the stage
STAGE_FILLS = ("carry", "zeros")
BACKENDS = ("eager", "inductor", "onnxruntime", "tensorrt")
# None is "paper": ToP's sites (blocks 5, 10, 15 of 24, scaled) with one keep rate solved for ratio.
NAMED_SCHEDULES = ("top", "paper", "uniform", "auto")


@dataclass(frozen=True)
class PruneSettings:
    ratio: float = 0.3
    schedule: Optional[Union[str, dict]] = None
    alignment: str = "hold"
    metric: str = DEFAULT_METRIC
    backend: str = "eager"
    verify: bool = True
    stage_fill: str = "carry"

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be a number in [0, 1) (the fraction of FLOPs to remove); got {self.ratio!r}")
        if self.alignment not in ALIGNMENT_CHOICES:
            raise ValueError(f"alignment must be one of {ALIGNMENT_CHOICES}; got {self.alignment!r}")
        if not callable(self.metric) and self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS} or a callable (y, token_dim) -> scores (B, L); "
                             f"got {self.metric!r}")
        if self.stage_fill not in STAGE_FILLS:
            raise ValueError(f"stage_fill must be one of {STAGE_FILLS}; got {self.stage_fill!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        validate_schedule(self.schedule)

    @property
    def needs_calibration(self) -> bool:
        """schedule="auto" and alignment="auto" are chosen on calibration batches."""
        return self.schedule == "auto" or self.alignment == "auto"


def validate_schedule(schedule) -> None:
    if schedule is None or schedule in NAMED_SCHEDULES:
        return
    if isinstance(schedule, str) or not isinstance(schedule, dict) or not schedule:
        raise ValueError(
            f"schedule must be None, one of {NAMED_SCHEDULES}, or a non-empty dict {{block_index: keep_rate}} "
            f"(a site after the first block_index blocks); got {schedule!r}")
    for key, keep in schedule.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 1:
            raise ValueError(f"schedule keys are block indices >= 1 (prune after that many blocks); got {key!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"schedule keep rates must be in (0, 1]; got {keep!r} at block {key}")
