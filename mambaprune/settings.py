"""The one settings object carried through the pipeline, validated once at the API boundary.

Every stage after capture receives a `PruneSettings`: the planner its ratio and schedule, the
rewrite its alignment, metric and fill, the API its backend. The choices are typed enums
whose values are the strings users pass (`Alignment("hold") is Alignment.HOLD`), so a setting is
spelled once and a misspelling fails where it is made.
"""
from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

from .errors import InvalidArgumentError
from .runtime.token_index import METRICS


class Choice(str, enum.Enum):
    """A string-valued option: compares equal to, prints as and formats as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, what: str) -> "Choice":
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgumentError(f"{what} must be one of {cls.values()}; got {value!r}") from None

    @classmethod
    def values(cls) -> tuple:
        return tuple(member.value for member in cls)


class Alignment(Choice):
    """How a pruned token's neighbours and scan state are seen downstream (DESIGN.md)."""

    NONE = "none"
    NONE_UNSORTED = "none-unsorted"
    HOLD = "hold"
    DECAY = "decay"
    AUTO = "auto"          # chosen on calibration batches (search/alignment.py)

    @property
    def keeps_order(self) -> bool:
        """Kept tokens stay sorted by original position (all but the EViT-style ablation)."""
        return self is not Alignment.NONE_UNSORTED

    @property
    def claims_positions(self) -> bool:
        """Token mixers see the kept tokens at their original positions (hold, decay)."""
        return self in (Alignment.HOLD, Alignment.DECAY)


class Fill(Choice):
    """What a pruned position holds where pruned tokens are restored to full length: a graph output
    that carries tokens (a feature map), and a hierarchical model's stage before its downsampling
    (rewrite/restore.py)."""

    CARRY = "carry"        # the value the token had when it was pruned, through the same per-token ops
    NEAREST = "nearest"    # the value of the nearest kept token
    ZEROS = "zeros"


StageFill = Fill   # the name before outputs were restored with the same setting


class Reduction(Choice):
    """What happens to the tokens a site prunes (rewrite/merge.py).

    `drop` discards them. The merge modes average each pruned token's stream value into one kept token,
    weighted by size (ToMe's proportional averaging: a token that already absorbed m tokens counts
    1 + m), so the blocks downstream see the pruned content: `merge-nearest` into the kept token nearest
    in the original positions (cell distance on a grid, position distance on a sequence),
    `merge-similar` into the kept token most similar by cosine of the stream values (ToMe)."""

    DROP = "drop"
    MERGE_NEAREST = "merge-nearest"
    MERGE_SIMILAR = "merge-similar"

    @property
    def merges(self) -> bool:
        return self is not Reduction.DROP


class Backend(Choice):
    EAGER = "eager"
    INDUCTOR = "inductor"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


# chosen from benchmarks/fidelity.py (README, "Fidelity")
DEFAULT_METRIC = "novelty"

ALIGNMENTS = tuple(a.value for a in Alignment if a is not Alignment.AUTO)
# what compile_pruned accepts: a concrete alignment, or "auto"
ALIGNMENT_CHOICES = Alignment.values()
FILLS = Fill.values()
STAGE_FILLS = FILLS
REDUCTIONS = Reduction.values()
BACKENDS = Backend.values()
# None is "paper": ToP's sites (blocks 5, 10, 15 of 24, scaled) with one keep rate solved for ratio.
NAMED_SCHEDULES = ("top", "paper", "uniform", "auto")

Metric = Union[str, Callable]


@dataclass(frozen=True)
class PruneSettings:
    ratio: float = 0.3
    schedule: Optional[Union[str, dict]] = None
    alignment: Alignment = Alignment.HOLD
    metric: Metric = DEFAULT_METRIC
    backend: Backend = Backend.EAGER
    verify: bool = True
    fill: Fill = Fill.CARRY
    reduction: Reduction = Reduction.DROP

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0 <= self.ratio < 1:
            raise InvalidArgumentError(f"ratio must be a number in [0, 1) (the fraction of FLOPs to remove); got {self.ratio!r}")
        object.__setattr__(self, "alignment", Alignment.parse(self.alignment, "alignment"))
        if not callable(self.metric) and self.metric not in METRICS:
            raise InvalidArgumentError(f"metric must be one of {METRICS} or a callable (y, token_dim) -> scores (B, L); "
                             f"got {self.metric!r}")
        object.__setattr__(self, "fill", Fill.parse(self.fill, "fill"))
        object.__setattr__(self, "reduction", Reduction.parse(self.reduction, "reduction"))
        object.__setattr__(self, "backend", Backend.parse(self.backend, "backend"))
        validate_schedule(self.schedule)

    @property
    def needs_calibration(self) -> bool:
        """schedule="auto" and alignment="auto" are chosen on calibration batches."""
        return self.schedule == "auto" or self.alignment is Alignment.AUTO

    def with_(self, **changes) -> "PruneSettings":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def validate_schedule(schedule) -> None:
    if schedule is None or schedule in NAMED_SCHEDULES:
        return
    if isinstance(schedule, str) or not isinstance(schedule, dict) or not schedule:
        raise InvalidArgumentError(
            f"schedule must be None, one of {NAMED_SCHEDULES}, or a non-empty dict {{block_index: keep_rate}} "
            f"(a site after the first block_index blocks); got {schedule!r}")
    for key, keep in schedule.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 1:
            raise InvalidArgumentError(f"schedule keys are block indices >= 1 (prune after that many blocks); got {key!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise InvalidArgumentError(f"schedule keep rates must be in (0, 1]; got {keep!r} at block {key}")
