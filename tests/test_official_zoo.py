"""compile_pruned on published vision-SSM code outside the four families it was taught
(tests/official_zoo: each family reproduced in its authors' style, tiny sizes).

Every family goes through the same checks (official_zoo/checks.py): ratio 0 reproduces the model;
at ratio 0.3 (or the family's own RATIO where its tiny config cannot reach 0.3) either a pruned model
(FLOPs reduction within 0.03 of it, the keep-all build at the same sites
reproduces the model, batch invariant, finite, outputs changed), or a refusal that names what was not
understood and where; the user's model is untouched either way. EXPECTED records which outcome each
family has today, so a change in either direction shows here.
"""
from __future__ import annotations

import functools

import pytest
import torch

from mambaprune import compile_pruned
from mambaprune.errors import InvalidArgumentError, UnreachableRatioError, UnsupportedModelError
from tests import official_zoo
from tests.official_zoo import checks

# family -> None (pruned at 0.3 with every check green) or (exception type, fragments the refusal must hold:
# what was not understood, and where)
NO_SCAN = "no selective scan was found in the captured graph"
EXPECTED = {
    "localmamba": None,
    "videomamba": None,
    "mambar": None,           # the extensions' fwd found by behaviour (the scan's tuple, the causal conv1d)
    "mamba_nd": (UnsupportedModelError, ["aten::im2col", "backbone.layers.3.down_sample_layer.sampler",
                                         "after block 1 (backbone.layers.0.mixer)"]),
    "groupmamba": None,       # checked at its own RATIO (0.2): each stage ends in a dense downsampling
    "simba": None,            # the same
    # the atrous scan's strided slice writes into new_empty are not followed (capture/slice_fills.py: step 1 only)
    "efficientvmamba": (UnsupportedModelError, ["a (B, 32, 8, 8) tensor built by aten::new_empty and 4 strided "
                                                "slice writes along dim 2, 3", "after block 1 (layers.0.blocks.0.op)"]),
    # PatchMerging2D reads each stage's grid through 8 strided slices: sites in the last stage only, 0.041 at most
    "medmamba": (UnreachableRatioError, ["the maximum FLOPs reduction with pruning after blocks [5] is 0.041"]),
}


@functools.lru_cache(maxsize=None)
def outcome(name: str) -> checks.Outcome:
    with official_zoo.installed():
        torch.manual_seed(0)
        module = official_zoo.family(name)
        model = module.tiny().eval()
        return checks.run(name, model, model.img_size, ratio=checks.ratio_for(module))


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(official_zoo.FAMILIES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_users_model_is_untouched(name):
    assert outcome(name).untouched


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ratio_zero_reproduces_the_model(name):
    out = outcome(name)
    if out.refusal is not None and out.report is None and out.ratio0_diff != out.ratio0_diff:
        pytest.skip(f"nothing compiles: {type(out.refusal).__name__}")       # refused at capture (checked below)
    assert out.ratio0_diff <= checks.TOL


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e is None))
def test_pruned_at_0_3_with_every_check_green(name):
    out = outcome(name)
    assert out.refusal is None, f"{type(out.refusal).__name__}: {out.refusal}"
    report = out.report
    assert abs(report.achieved_ratio - out.ratio) <= 0.03, str(report)
    assert report.sites and report.not_understood == []
    assert out.keep_all_diff <= checks.TOL, "keeping every token at the pruned sites must reproduce the model"
    assert out.batch_diff <= checks.TOL
    assert out.finite and out.changed > 0
    assert checks.green(out)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e is not None))
def test_refusal_names_what_and_where(name):
    kind, fragments = EXPECTED[name]
    out = outcome(name)
    assert out.pruned is None and isinstance(out.refusal, kind), out.refusal
    message = str(out.refusal)
    for fragment in fragments:
        assert fragment in message, message



def test_a_stage_read_through_strided_slices_without_token_facts_is_refused_before_the_rewrite():
    """MedMamba's PatchMerging2D at 8x8 grids: the token flow of its strided slices is not inferred (no fact),
    and a site inside the stage once passed the analysis, then failed in the rewrite with torch's own error
    (a cat of slices of different sizes). Every slice reads the pruned stream beside the one restored
    downsampling input, so the site is refused, by name, before anything is built."""
    with official_zoo.installed():
        torch.manual_seed(0)
        model = official_zoo.family("medmamba").tiny().eval()
        x = torch.randn(2, 3, model.img_size, model.img_size)
        with pytest.raises(InvalidArgumentError, match=r"after block 1: the downsampling layers.0.downsample reads the "
                                                       r"stage's grid through 8 strided slices"):
            compile_pruned(model, 0.1, (x,), schedule={1: 0.5})
