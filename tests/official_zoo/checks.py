"""The standard checks, run the same way on every family of the zoo (tests/test_official_zoo.py and
benchmarks/support_table.py): ratio 0 reproduces the model; at ratio 0.3 either a pruned model whose
FLOPs reduction is 0.3 +- 0.03, whose keep-all build (a schedule keeping every token at the same
sites) reproduces the model, batch invariant and finite, or a refusal (its exception and message);
and the user's model untouched (state_dict and outputs as before).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from mambaprune.api.compile import build, prepare
from mambaprune.settings import PruneSettings as settings

RATIO = 0.3
TOL = 1e-5


@dataclass
class Outcome:
    family: str
    ratio: float = RATIO                 # the ratio the pruned checks ran at
    ratio0_diff: float = float("nan")
    pruned: Optional[torch.nn.Module] = None
    refusal: Optional[BaseException] = None
    keep_all_diff: float = float("nan")
    batch_diff: float = float("nan")
    finite: bool = False
    changed: float = float("nan")        # max |pruned - dense|: pruning changed the outputs
    untouched: bool = False
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def report(self):
        return None if self.pruned is None else self.pruned.report


def ratio_for(family_module) -> float:
    """The ratio a family's pruned checks run at: RATIO, or the family's own `RATIO` where its tiny config
    cannot reach RATIO (every stage ending in a dense downsampling leaves little to prune at tiny depths)."""
    return getattr(family_module, "RATIO", RATIO)


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def run(family: str, model: torch.nn.Module, size: int, fill: str = "carry", ratio: float = RATIO) -> Outcome:
    start = time.perf_counter()
    out = Outcome(family, ratio)
    x = images(3, size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x)
    try:
        prepared = prepare(model, (x[:1],))
    except Exception as err:  # noqa: BLE001 - a refusal is an outcome to report (nothing can be compiled)
        out.refusal, prepared = err, None
    if prepared is not None:
        with torch.no_grad():
            out.ratio0_diff = max_diff(build(prepared, settings(ratio=0.0))(x), dense)
        try:
            out.pruned = build(prepared, settings(ratio=ratio, fill=fill))
        except Exception as err:  # noqa: BLE001 - a refusal is an outcome to report
            out.refusal = err
    if out.pruned is not None:
        sites = out.pruned.report.sites
        keep_all = build(prepared, settings(ratio=ratio, schedule={k: 1.0 for k in sites}, fill=fill, verify=False))
        with torch.no_grad():
            out.keep_all_diff = max_diff(keep_all(x), dense)
            y = out.pruned(x)
            out.batch_diff = max(max_diff(out.pruned(x[i:i + 1])[0], y[i]) for i in range(len(x)))
            out.finite = bool(torch.isfinite(y).all())
            out.changed = max_diff(y, dense)
    with torch.no_grad():
        same_outputs = torch.equal(model(x), dense)
    out.untouched = same_outputs and set(state) == set(model.state_dict()) and all(
        torch.equal(state[k], v) for k, v in model.state_dict().items())
    out.seconds = time.perf_counter() - start
    return out


def green(out: Outcome) -> bool:
    """Every check of a pruned family passed."""
    r = out.report
    return (r is not None and out.ratio0_diff <= TOL and abs(r.achieved_ratio - out.ratio) <= 0.03 and bool(r.sites)
            and out.keep_all_diff <= TOL and out.batch_diff <= TOL and out.finite and out.changed > 0
            and out.untouched)
