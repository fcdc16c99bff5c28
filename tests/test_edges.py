"""The edges a user hits (issue 19, items 4-11): batch 0, export files, pickling, the call signature,
unchecked inputs, wrapped and training models. Every test triggers its edge on a tiny ViM."""
import io
import copy
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import mambaprune
from mambaprune.errors import (ExportPathError, FrozenArgumentError, InputMismatchError, InvalidArgumentError,
                               MambapruneError, UnsupportedModelError)
from mambaprune.api import build, prepare
from mambaprune.models import create_model
from mambaprune.deployment import export as export_module


def tiny_vim(depth=4):
    torch.manual_seed(0)
    return create_model("vim_t", img_size=32, patch_size=8, depth=depth, embed_dim=32, d_state=4,
                        num_classes=10).eval()


@pytest.fixture(scope="module")
def vim():
    return tiny_vim()


@pytest.fixture(scope="module")
def prepared(vim):
    return prepare(vim)


@pytest.fixture(scope="module")
def pruned(prepared):
    from mambaprune.settings import PruneSettings
    return build(prepared, PruneSettings(ratio=0.3))


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- 5: batch 0 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_batch_of_zero_gives_the_dense_models_empty_result(vim, backend):
    pruned = mambaprune.compile_pruned(vim, ratio=0.3, backend=backend)
    x = images(0)
    with torch.no_grad():
        dense, got = vim(x), pruned(x)
    assert got.shape == dense.shape == (0, 10) and got.dtype == dense.dtype
    if backend == "eager":   # (inductor would compile: slow)
        assert pruned(images(2)).shape == (2, 10)   # the short cut is for 0 only


# -- 4 and 10: export files -----------------------------------------------------------------------------
def test_an_export_gets_a_normal_files_mode_and_a_replaced_file_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.bin"
        export_module.atomic_write(fresh, lambda tmp: open(tmp, "wb").write(b"new"))
        assert fresh.stat().st_mode & 0o777 == 0o644      # 0666 & ~umask, not mkstemp's 0600
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        export_module.atomic_write(kept, lambda tmp: open(tmp, "wb").write(b"new"))
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)


def test_a_real_pt2_export_is_readable_by_others(pruned, tmp_path):
    old = os.umask(0o022)
    try:
        path = pruned.export(tmp_path / "model.pt2")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_an_unwritable_folder_is_named_before_the_conversion_runs(pruned, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the conversion ran before the folder was checked")

    monkeypatch.setattr(export_module.tempfile, "mkstemp", refuse)   # a read-only folder (root ignores chmod)
    monkeypatch.setattr(export_module, "reexport", no_conversion)
    with pytest.raises(ExportPathError, match="cannot be written") as info:
        pruned.export(tmp_path / "model.pt2")
    assert str(tmp_path) in str(info.value) and ".tmp" not in str(info.value)
    assert isinstance(info.value, OSError)


def test_format_and_suffix_that_disagree_are_refused(pruned, tmp_path):
    with pytest.raises(InvalidArgumentError, match="disagrees with the path"):
        pruned.export(tmp_path / "model.pt2", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_report_of_a_fixed_schedule_says_the_ratio_is_unused(prepared):
    from mambaprune.settings import PruneSettings
    top = build(prepared, PruneSettings(ratio=0.1, schedule="top"))
    line = next(line for line in str(top.report).splitlines() if line.startswith("FLOPs"))
    assert f"reduction {top.report.achieved_ratio:.3f} (" in line   # measured on the pruned graph
    assert "ratio 0.1 unused" in line and "target" not in line


def test_a_data_dependent_export_failure_is_one_error_without_the_graph(capfd):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.vim = tiny_vim(2)

        def forward(self, x):
            y = self.vim(x)
            return y if y.sum() > 0 else -y

    with pytest.raises(UnsupportedModelError, match="could not capture"):
        mambaprune.compile_pruned(DataDependent().eval(), ratio=0.3, example_inputs=(images(1),))
    err = capfd.readouterr().err
    assert "def forward" not in err and err.count("\n") < 5, err[:2000]


# -- 8: pickling ---------------------------------------------------------------------------------------
def test_torch_save_and_load_give_the_same_model(pruned):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch's own TreeSpec pickling
        torch.save(pruned, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        cloned = copy.deepcopy(pruned)
        again = pickle.loads(pickle.dumps(pruned))
    x = images(3)
    with torch.no_grad():
        expected = pruned(x)
        for other in (loaded, cloned, again):
            assert torch.equal(other(x), expected)
    kept = pruned.kept_positions(x)
    assert kept and {k: v.tolist() for k, v in loaded.kept_positions(x).items()} == {k: v.tolist() for k, v in kept.items()}
    assert str(loaded.report) == str(pruned.report)
    assert loaded(images(0)).shape == (0, 10)



def test_the_state_dict_lists_each_weight_once_and_loads_back(pruned):
    state = pruned.state_dict()
    assert set(state) == {f"graph_module.{k}" for k in pruned.graph_module.state_dict()}
    other = copy.deepcopy(pruned)
    for tensor in other.state_dict().values():
        if tensor.is_floating_point():
            tensor.zero_()
    other.load_state_dict(state)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(other(x), pruned(x))

# -- 7: the call signature -----------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.vim = tiny_vim()

    def forward(self, x, scale=2.0):
        return self.vim(x) * scale


@pytest.fixture(scope="module")
def scaled():
    return Scaled().eval()


def test_keyword_arguments_bind_like_the_original_forward(scaled):
    dense = mambaprune.compile_pruned(scaled, ratio=0.0, example_inputs=(images(1),))
    x = images(2)
    with torch.no_grad():
        expected = scaled(x)
        for call in (lambda: dense(x), lambda: dense(x=x), lambda: dense(x, scale=2.0), lambda: dense(x, 2.0)):
            assert torch.allclose(call(), expected, atol=1e-5)
    assert "arguments frozen at their compiled values" in str(dense.report) and "scale=2.0" in str(dense.report)


def test_a_frozen_argument_with_another_value_is_refused_naming_it(scaled):
    pruned = mambaprune.compile_pruned(scaled, ratio=0.3, example_inputs=(images(1), 3.0))
    assert pruned.report.frozen_arguments == {"scale": 3.0}
    with torch.no_grad():
        assert torch.allclose(pruned(images(2), scale=3.0), pruned(images(2)))
    with pytest.raises(FrozenArgumentError, match=r"'scale' was frozen at its compiled value 3.0.*got 2.5"):
        pruned(images(2), scale=2.5)
    with pytest.raises(InputMismatchError, match="unexpected keyword argument 'gain'"):
        pruned(images(2), gain=1.0)
    with pytest.raises(InputMismatchError, match="twice"):
        pruned(images(2), x=images(2))


# -- 6: unchecked inputs -------------------------------------------------------------------------------
def scalar_metric(y, token_dim):
    return y.sum()


def nan_metric(y, token_dim):
    return torch.full(y.movedim(token_dim, 1).shape[:2], float("nan"))


def per_sample_metric(y, token_dim):
    return y.flatten(1).sum(-1)


def integer_metric(y, token_dim):
    return torch.ones(y.movedim(token_dim, 1).shape[:2], dtype=torch.long)


def good_metric(y, token_dim):
    return y.movedim(token_dim, 1).flatten(2).abs().sum(-1)


@pytest.mark.parametrize("metric, said", [
    (scalar_metric, r"a tensor of shape \(\)"), (nan_metric, "scores that are not all finite"),
    (per_sample_metric, r"a tensor of shape \(1,\)"), (integer_metric, "a tensor of dtype torch.int64"),
])
def test_a_bad_metric_is_refused_at_compile_time_saying_what_it_returned(prepared, metric, said):
    from mambaprune.settings import PruneSettings
    with pytest.raises(InvalidArgumentError, match=f"metric {metric.__name__} returned {said}"):
        build(prepared, PruneSettings(ratio=0.3, metric=metric))


def test_a_good_callable_metric_compiles_and_runs(prepared):
    from mambaprune.settings import PruneSettings
    pruned = build(prepared, PruneSettings(ratio=0.3, metric=good_metric))
    assert pruned(images(3)).shape == (3, 10)


def test_a_model_with_a_callable_metric_says_how_to_save_it(prepared):
    from mambaprune.settings import PruneSettings
    pruned = build(prepared, PruneSettings(ratio=0.3, metric=good_metric))
    with pytest.raises(TypeError, match=r"cannot be pickled.*\.export\('model.pt2'\)") as info:
        torch.save(pruned, io.BytesIO())
    assert isinstance(info.value, MambapruneError)


@pytest.mark.parametrize("calibration, said", [
    (images(4), "single tensor .* list of batches"),
    (np.zeros((4, 3, 32, 32), dtype=np.float32), "torch.from_numpy"),
    ([np.zeros((4, 3, 32, 32), dtype=np.float32)], "torch.from_numpy"),
    ([images(0)], "at least one sample"),
    ([images(2), torch.randn(2, 3, 16, 16)], r"batch 1 has shape \(2, 3, 16, 16\)"),
    ([images(2).double()], "dtype torch.float64"),
    (5, "list of batches"),
])
def test_bad_calibration_is_refused_before_the_capture(vim, calibration, said, monkeypatch):
    import mambaprune.api.compile as compile_module
    monkeypatch.setattr(compile_module, "prepare", lambda *a, **k: pytest.fail("captured before checking"))
    with pytest.raises(InvalidArgumentError, match=said):
        mambaprune.compile_pruned(vim, ratio=0.3, alignment="auto", calibration=calibration,
                                  example_inputs=(images(1),))


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile])
def test_wrapped_models_are_unwrapped_without_touching_them(vim, pruned, wrap):
    wrapped = wrap(vim)
    got = mambaprune.compile_pruned(wrapped, ratio=0.3)
    x = images(3)
    with torch.no_grad():
        assert torch.allclose(got(x), pruned(x), atol=1e-6)
    assert (wrapped.module if isinstance(wrapped, nn.DataParallel) else wrapped._orig_mod) is vim


def test_a_model_in_train_mode_is_captured_in_eval_mode_with_a_warning():
    model = tiny_vim().train()
    with pytest.warns(UserWarning, match=r"train\(\) mode; it is captured in eval\(\) mode"):
        pruned = mambaprune.compile_pruned(model, ratio=0.0)
    assert model.training
    with torch.no_grad():
        assert torch.allclose(pruned(images(2)), model.eval()(images(2)), atol=1e-5)


def test_every_new_error_is_a_mambaprune_error():
    for error in (ExportPathError, FrozenArgumentError, InputMismatchError, InvalidArgumentError):
        assert issubclass(error, MambapruneError)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(ExportPathError, OSError)


def test_hooks_run_during_compile_and_never_on_the_pruned_model():
    model = tiny_vim()
    calls = []
    handle = model.layers[0].register_forward_hook(lambda module, args, out: calls.append(1))
    pruned = mambaprune.compile_pruned(model, ratio=0.3)
    during_compile = len(calls)
    with torch.no_grad():
        pruned(images(2))
    assert during_compile >= 1 and len(calls) == during_compile   # as README's API tour says
    handle.remove()


def test_an_inductor_model_pickles_and_rebuilds_its_runner(vim):
    fast = mambaprune.compile_pruned(vim, ratio=0.3, backend="inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = pickle.loads(pickle.dumps(fast))
    assert isinstance(loaded._runner, torch._dynamo.eval_frame.OptimizedModule)   # compiled lazily, on first call
    assert loaded(images(0)).shape == (0, 10)


def test_an_output_that_does_not_follow_the_batch_is_computed_for_a_batch_of_zero():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.vim = tiny_vim()
            self.register_buffer("bias", torch.arange(3.0))

        def forward(self, x):
            return self.vim(x), self.bias * 2

    model = WithConstant().eval()
    pruned = mambaprune.compile_pruned(model, ratio=0.0, example_inputs=(images(1),))
    from mambaprune.api.pruned_model import empty_outputs
    assert empty_outputs(pruned.graph_module) is None   # not all outputs are empty at batch 0: run the graph


def test_held_torch_output_is_per_thread_and_restores_stderr():
    import sys
    import threading
    from mambaprune.runtime.torch_logs import torch_logs_held
    real, seen = sys.stderr, io.StringIO()
    sys.stderr = seen
    try:
        inside, outside = threading.Event(), threading.Event()

        def other_thread():
            inside.wait()
            print("from another thread", file=sys.stderr)
            outside.set()

        worker = threading.Thread(target=other_thread)
        worker.start()
        with pytest.raises(RuntimeError):
            with torch_logs_held():
                print("the whole graph", file=sys.stderr)
                inside.set()
                outside.wait()
                raise RuntimeError("export failed")
        worker.join()
        with torch_logs_held():
            with torch_logs_held():
                print("kept on success", file=sys.stderr)
        assert sys.stderr is seen
    finally:
        sys.stderr = real
    assert seen.getvalue() == "from another thread\nkept on success\n"
