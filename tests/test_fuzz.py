"""Bad inputs thrown at compile_pruned, a pruned model's call and the command line (issue 19).

Each draw either works (at ratio 0 the output equals the dense model's) or raises a documented
mambaprune error (a MambapruneError subclass; docs/errors.md): never another exception type.
The tiny model is captured once per module; compile_pruned's settings are fuzzed on that capture
(`prepare` is the slow part), example inputs with a real capture each (few examples).
``HYPOTHESIS_PROFILE=nightly`` draws ten times as many.
"""
import contextlib
import io
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mambaprune
import mambaprune.api.compile as compile_module
from mambaprune.__main__ import main
from mambaprune.api import prepare
from mambaprune.errors import MambapruneError
from mambaprune.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"


def examples(ci: int):
    return settings(max_examples=ci * 10 if NIGHTLY else ci)


def tiny_vim():
    torch.manual_seed(0)
    return create_model("vim_t", img_size=32, patch_size=8, depth=6, embed_dim=32, d_state=4, num_classes=10).eval()


MODEL = tiny_vim()
_PREPARED = {}


def cached_prepare(model, example_inputs=None):
    """The real capture of the tiny model, made once (settings do not change it)."""
    same = (example_inputs is None and isinstance(model, type(MODEL))
            and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), MODEL.state_dict().values())))
    if not same:
        return prepare(model, example_inputs)
    if "tiny" not in _PREPARED:
        _PREPARED["tiny"] = prepare(MODEL)
    return _PREPARED["tiny"]


@pytest.fixture(autouse=True)
def one_capture(monkeypatch):
    monkeypatch.setattr(compile_module, "prepare", cached_prepare)


def images(batch, size=32, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(dtype)


def dense(x):
    with torch.no_grad():
        return MODEL(x)


junk = st.one_of(st.none(), st.text(max_size=4), st.integers(-3, 30), st.floats(allow_nan=True), st.booleans(),
                 st.lists(st.integers(-1, 7), max_size=2))
ratios = st.one_of(st.floats(-1, 1.5, allow_nan=False), st.just(0.0), st.just(1.0), st.just(float("nan")),
                   st.just(float("inf")), st.sampled_from(["0.3", None, True]), st.integers(-1, 2))
schedules = st.one_of(st.none(), st.sampled_from(["paper", "uniform", "top", "auto", "bottom", ""]),
                      st.dictionaries(st.one_of(st.integers(-1, 8), st.text(max_size=1)),
                                      st.one_of(st.floats(-0.5, 1.5), st.just(math.nan), st.text(max_size=1)),
                                      max_size=3), junk)
alignments = st.one_of(st.sampled_from(["hold", "decay", "none", "none-unsorted", "auto", "Hold"]), junk)


def scalar_metric(y, token_dim):
    return y.sum()


def per_sample_metric(y, token_dim):
    return y.flatten(1).sum(-1)


def abs_metric(y, token_dim):
    return y.movedim(token_dim, 1).flatten(2).abs().sum(-1)


metrics = st.one_of(st.sampled_from(["novelty", "clip", "l2", "random", "delta", "novelty-y", "l3", ""]),
                    st.sampled_from([scalar_metric, per_sample_metric, abs_metric]), junk)
calibrations = st.one_of(st.none(), st.just([images(2)]), st.just(images(2)), st.just([images(0)]),
                         st.just([images(2, 16)]), st.just([]), st.just([(images(2), torch.zeros(2))]), junk)


def works_or_documented(call):
    """The call's result, or None when it raised a MambapruneError (anything else fails the test)."""
    try:
        return call()
    except MambapruneError:
        return None


@examples(12)
@given(ratio=ratios, schedule=schedules, alignment=alignments, metric=metrics, calibration=calibrations,
       backend=st.sampled_from(["eager", "inductor", "tensorflow", None]),
       fill=st.sampled_from(["carry", "nearest", "zeros", "last"]))
def test_compile_pruned_settings(ratio, schedule, alignment, metric, calibration, backend, fill):
    pruned = works_or_documented(lambda: mambaprune.compile_pruned(
        MODEL, ratio=ratio, schedule=schedule, alignment=alignment, metric=metric, calibration=calibration,
        backend=backend, fill=fill))
    if pruned is None or backend != "eager":
        return
    x = images(2)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if ratio == 0 and schedule in (None, "paper", "uniform"):
        assert torch.allclose(out, dense(x), atol=1e-5)


example_inputs = st.one_of(
    st.builds(lambda b, s, dtype: (images(b, s, dtype),), st.integers(0, 2), st.sampled_from([16, 32, 33]),
              st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool])),
    st.builds(lambda shape: (torch.randn(tuple(shape)),), st.lists(st.integers(1, 4), max_size=3)),
    st.just(()), st.just((images(1), images(1))), st.just((images(1), 2.0)), junk)


@examples(3)
@given(inputs=example_inputs, ratio=st.sampled_from([0.0, 0.3]))
def test_compile_pruned_example_inputs(inputs, ratio):
    pruned = works_or_documented(lambda: mambaprune.compile_pruned(MODEL, ratio=ratio, example_inputs=inputs))
    if pruned is None:
        return
    if inputs is None:   # inferred from the model's declared size
        inputs = (images(2),)
    x = inputs[0] if isinstance(inputs, tuple) else inputs
    x = torch.cat([x, x]) if x.shape[0] == 1 else x
    with torch.no_grad():
        out = pruned(x)
    if ratio == 0:
        assert torch.allclose(out, dense(x), atol=1e-5)


PRUNED = {}


def pruned_at(ratio):
    if ratio not in PRUNED:
        PRUNED[ratio] = mambaprune.compile_pruned(MODEL, ratio=ratio)
    return PRUNED[ratio]


call_inputs = st.one_of(
    st.builds(lambda b, s, dtype: (images(b, s, dtype),), st.integers(0, 3), st.sampled_from([16, 32]),
              st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64])),
    st.builds(lambda shape: (torch.randn(tuple(shape)),), st.lists(st.integers(0, 4), max_size=5)),
    st.just(()), st.just((images(1), images(1))), st.tuples(junk), st.just((images(2).numpy(),)))
keywords = st.one_of(st.just({}), st.just({"x": images(2)}), st.dictionaries(st.sampled_from(["x", "scale", "y"]),
                                                                             junk, max_size=2))


@examples(25)
@given(args=call_inputs, kwargs=keywords, ratio=st.sampled_from([0.0, 0.3]))
def test_pruned_model_call(args, kwargs, ratio):
    pruned = pruned_at(ratio)
    with torch.no_grad():
        out = works_or_documented(lambda: pruned(*args, **kwargs))
    if out is None:
        return
    x = args[0] if args else kwargs["x"]
    assert out.shape == (x.shape[0], 10) and out.dtype == torch.float32
    if ratio == 0 or x.shape[0] == 0:
        assert torch.allclose(out, dense(x), atol=1e-5)


flags = st.lists(st.one_of(
    st.sampled_from(["--ratio", "--schedule", "--alignment", "--metric", "--img-size", "--input-shape",
                     "--calibration", "--stage-fill", "--batch", "--repeat", "--ratios", "-o"]),
    st.sampled_from(["0", "0.3", "-1", "1.5", "nan", "auto", "top", "3,32,32", "3,x", "m.xyz", "/nonexistent/m.pt2"])),
    max_size=4)


@examples(8)
@given(command=st.sampled_from(["report", "compile", "bench", "frobnicate"]),
       model=st.sampled_from(["cli_factories:tiny_vim", "cli_factories:raising", "cli_factories:not_a_model",
                              "nonsense", "no_such_module:f"]),
       extra=flags)
def test_command_line(command, model, extra):
    argv = [command, model, *extra]
    if command == "bench":
        argv += ["--repeat", "1", "--batch", "1", "--ratios", "0.0"]
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as done:   # argparse: usage errors exit 2, --help 0
            status = done.code
    err = printed.getvalue()
    assert status in (0, 2), (argv, err)
    if status == 2 and err.startswith("mambaprune: error:"):
        assert err.count("\n") == 1, err   # one line, no traceback
