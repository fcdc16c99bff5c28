"""The C++ CPU kernels are optional: a failed build, a missing ninja or MAMBAPRUNE_CPU_KERNELS=0 mean
one warning (at most) and the pure-PyTorch implementations, never an error."""

import warnings

import pytest
import torch

from mambaprune.errors import MissingDependencyError
from mambaprune.runtime import chosen_scan_impl, cpu_kernels, pos_conv1d, pos_conv2d, selective_scan
from mambaprune.runtime.scan_cpp import selective_scan_cpp
from scan_inputs import inputs, naive_scan
from test_token_ops import direct_pos_conv1d, direct_pos_conv2d, random_positions


@pytest.fixture
def fresh_load(monkeypatch):
    """Forget the real load's outcome for one test, and load the real kernels again afterwards."""
    cpu_kernels.reset_cpu_kernels_cache()
    yield monkeypatch
    monkeypatch.undo()
    cpu_kernels.reset_cpu_kernels_cache()


@pytest.fixture
def failed_build(fresh_load):
    def fail(isa):
        raise RuntimeError("Error building extension:\nscan.h:12:3: error: simulated compiler failure\nninja: stopped")

    fresh_load.setattr(cpu_kernels, "_build_and_load", fail)
    return fresh_load


def _runs_without_kernels():
    """The scan (default and forced 'cpp') and both convs give the definitions' values."""
    args = inputs(groups=3, extras=True)
    assert chosen_scan_impl(torch.randn(1, 8, 3), dstate=16) == "reference"  # 128 state elements per token
    assert chosen_scan_impl(torch.randn(1, 9, 3), dstate=16) == "sequential"  # 144
    expected = naive_scan(**args)
    assert (selective_scan(**args).double() - expected).abs().max() <= 1e-5
    x, weight, bias = torch.randn(2, 5, 9), torch.randn(5, 1, 4), torch.randn(5)
    pos = random_positions(2, 9, 20)
    assert (pos_conv1d(x, weight, bias, pos, 3).double() - direct_pos_conv1d(x, weight, bias, pos, 3)).abs().max() <= 1e-5
    x2, weight2 = torch.randn(2, 9, 5), torch.randn(5, 1, 3, 3)
    got = pos_conv2d(x2, weight2, bias, pos, 4, 5, 1)
    assert (got.double() - direct_pos_conv2d(x2, weight2, bias, pos, 4, 5, 1)).abs().max() <= 1e-5


def test_a_failed_build_warns_once_and_everything_falls_back(failed_build):
    failed_build.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _runs_without_kernels()
        failed_build.setenv("MAMBAPRUNE_SCAN_IMPL", "cpp")  # forced, but it cannot run: the same fallback
        assert chosen_scan_impl(torch.randn(1, 2, 3)) == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "C++ CPU kernels are unavailable" in messages[0] and "pip install ninja" in messages[0]
    status = cpu_kernels.cpu_kernels_status()
    assert not status.available
    assert status.detail == "build failed: RuntimeError: scan.h:12:3: error: simulated compiler failure"


def test_without_ninja_the_warning_names_it(fresh_load):
    from torch.utils import cpp_extension

    fresh_load.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"ninja is not installed \(pip install ninja\)"):
        assert cpu_kernels.load_cpu_kernels() is None


def test_without_a_compiler_the_warning_names_it(fresh_load):
    fresh_load.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found \\('no-such-compiler-here'"):
        assert cpu_kernels.load_cpu_kernels() is None


def test_disabled_kernels_fall_back_silently(fresh_load):
    fresh_load.setenv("MAMBAPRUNE_CPU_KERNELS", "0")
    fresh_load.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _runs_without_kernels()
    assert cpu_kernels.cpu_kernels_status().detail == "disabled by MAMBAPRUNE_CPU_KERNELS=0"


def test_calling_the_kernel_wrapper_without_kernels_names_the_fix(fresh_load):
    fresh_load.setenv("MAMBAPRUNE_CPU_KERNELS", "0")
    with pytest.raises(MissingDependencyError, match="pip install ninja.*MAMBAPRUNE_SCAN_IMPL=sequential"):
        selective_scan_cpp(**inputs())


def test_the_kernels_load_again_after_a_reset():
    cpu_kernels.reset_cpu_kernels_cache()
    status = cpu_kernels.cpu_kernels_status()
    if not status.available:
        pytest.skip(f"the C++ CPU kernels are unavailable here: {status.detail}")
    assert chosen_scan_impl(torch.randn(1, 2, 3)) == "cpp"


def test_the_kernel_wrapper_on_other_devices_names_the_alternatives():
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    with pytest.raises(ValueError, match=r"needs CPU tensors; got u on meta\. Use MAMBAPRUNE_SCAN_IMPL=triton or reference"):
        selective_scan_cpp(**meta)
