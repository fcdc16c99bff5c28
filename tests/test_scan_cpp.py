"""Tests of the C++ CPU scan (scan_cpp, csrc/scan.h): every option against the float64 definition,
any strides, dtypes, edge cases, gradients, and its dispatch from mambaprune::selective_scan."""

import itertools

import pytest
import torch

from mambaprune.runtime import chosen_scan_impl, selective_scan
from mambaprune.runtime.cpu_kernels import cpu_kernels_status
from mambaprune.runtime.scan_cpp import selective_scan_cpp, selective_scan_cpp_backward
from mambaprune.runtime.scan_reference import selective_scan_reference
from scan_inputs import inputs, naive_scan, positional

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
OPTIONS = ("D", "z", "delta_bias", "delta_softplus", "gap")
COMBINATIONS = [dict.fromkeys(chosen, True) for r in range(len(OPTIONS) + 1)
                for chosen in itertools.combinations(OPTIONS, r)]


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    status = cpu_kernels_status()
    if not status.available:
        pytest.skip(f"the C++ CPU kernels are unavailable here: {status.detail}")


def max_error(got, expected) -> float:
    """Largest absolute error, relative to the output's scale once that exceeds 1 (delta_bias without
    softplus makes some steps negative, so some states grow)."""
    return float((got.double() - expected).abs().max()) / max(1.0, float(expected.abs().max()))


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every axis' stride doubled."""
    room = t.new_zeros([2 * size for size in t.shape])
    view = room[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "+".join(o) or "plain")
def test_every_option_combination_matches_the_float64_definition(options, groups):
    args = inputs(groups=groups, **options)  # dim 12: 4 channels per group, a partial vector block
    got = selective_scan_cpp(**args)
    assert got.dtype == torch.float32 and got.shape == args["u"].shape and got.is_contiguous()
    assert max_error(got, naive_scan(**args)) <= 1e-5


@pytest.mark.parametrize("dim,groups,dstate,length", [(40, 2, 16, 50), (37, None, 16, 23), (64, 4, 1, 197)])
def test_wide_and_odd_shapes_match_the_definition(dim, groups, dstate, length):
    args = inputs(dim=dim, groups=groups, dstate=dstate, length=length, extras=True, batch=3)
    assert max_error(selective_scan_cpp(**args), naive_scan(**args)) <= 1e-5


def test_float_gap_matches_the_definition():
    args = dict(inputs(extras=True), gap=torch.rand(2, 9) * 3 + 1)
    assert max_error(selective_scan_cpp(**args), naive_scan(**args)) <= 1e-5


def test_any_strides_read_in_place_give_the_same_bits():
    args = inputs(groups=3, extras=True)
    expected = selective_scan_cpp(**args)
    channels_last = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if k in ("u", "delta", "z", "B", "C")
                         else v) for k, v in args.items()}
    assert not channels_last["u"].is_contiguous()
    everything_strided = {k: strided_copy(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    shared_B = dict(args, B=args["B"][:1].expand_as(args["B"]))  # stride 0 over the batch
    assert torch.equal(selective_scan_cpp(**channels_last), expected)
    assert torch.equal(selective_scan_cpp(**everything_strided), expected)
    assert max_error(selective_scan_cpp(**shared_B), naive_scan(**shared_B)) <= 1e-5


def test_float64_is_exact_and_mixed_dtypes_compute_in_float64():
    args = inputs(torch.float64, groups=2, extras=True)
    got = selective_scan_cpp(**args)
    assert got.dtype == torch.float64 and max_error(got, naive_scan(**args)) <= 1e-12
    mixed = dict(args, u=args["u"].float())  # like the reference: fp64 anywhere -> fp64 arithmetic
    out = selective_scan_cpp(**mixed)
    assert out.dtype == torch.float32
    assert max_error(out, naive_scan(**mixed)) <= 1e-7  # the float32 rounding of the output only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32_and_return_their_dtype(dtype):
    args = inputs(dtype, groups=2, extras=True)
    got = selective_scan_cpp(**args)
    upcast = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    assert got.dtype == dtype
    assert torch.equal(got, selective_scan_cpp(**upcast).to(dtype))


@pytest.mark.parametrize("batch,length", [(0, 9), (2, 1), (1, 2)])
def test_empty_batch_and_tiny_lengths(batch, length):
    args = {k: v.requires_grad_() if k in GRAD_NAMES else v
            for k, v in inputs(batch=batch, length=length, groups=3, extras=True).items()}
    y = selective_scan(**args)
    assert y.shape == (batch, 12, length)
    if batch:
        assert max_error(y.detach(), naive_scan(**{k: v.detach() if isinstance(v, torch.Tensor) else v
                                                    for k, v in args.items()})) <= 1e-5
    y.sum().backward()
    for name in GRAD_NAMES:
        assert args[name].grad.shape == args[name].shape, name
    if batch == 0:
        assert not args["A"].grad.any() and not args["D"].grad.any()


@pytest.mark.parametrize("with_gap", [False, True])
def test_gradcheck_through_the_op(monkeypatch, with_gap):
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "cpp")
    args = inputs(torch.float64, batch=2, dim=6, dstate=3, length=7, groups=2, extras=True)
    if not with_gap:
        args.pop("gap")
    tensors = tuple(args[name].requires_grad_() for name in GRAD_NAMES)

    def run(*values):
        return selective_scan(**dict(zip(GRAD_NAMES, values)), delta_softplus=True, gap=args.get("gap"))

    assert torch.autograd.gradcheck(run, tensors, eps=1e-6, atol=1e-7)


def test_float32_gradients_match_reference_autograd_at_a_wide_shape():
    args = inputs(dim=40, groups=2, dstate=16, length=50, extras=True, channels_last=True)
    grad_out = torch.randn(2, 40, 50)
    theirs = {k: v.clone().requires_grad_() if k in GRAD_NAMES else v for k, v in args.items()}
    expected = torch.autograd.grad(selective_scan_reference(**theirs), [theirs[k] for k in GRAD_NAMES], grad_out)
    ours = selective_scan_cpp_backward(grad_out, **args)
    for name, grad in zip(GRAD_NAMES, expected):
        assert ours[name].shape == args[name].shape and ours[name].dtype == args[name].dtype
        torch.testing.assert_close(ours[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_only_the_needed_gradients_are_returned():
    args = inputs(extras=True)
    u = args["u"].requires_grad_()
    selective_scan(**args).square().sum().backward()
    assert u.grad is not None and args["A"].grad is None
    expected = torch.autograd.grad(selective_scan_reference(**args).square().sum(), u)[0]
    torch.testing.assert_close(u.grad, expected, atol=1e-5, rtol=1e-5)


def _kernels_run(call) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return {e.name for e in prof.events() if e.name.startswith("mambaprune_cpu::")}


def test_the_op_runs_the_cpp_kernels_unless_another_implementation_is_forced(monkeypatch):
    monkeypatch.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    assert chosen_scan_impl(torch.randn(1, 2, 3)) == "cpp"
    assert chosen_scan_impl(torch.randn(8, 384, 3), dstate=16) == "cpp"
    args = {k: v.requires_grad_() if k == "u" else v for k, v in inputs(extras=True).items()}
    assert _kernels_run(lambda: selective_scan(**args).sum().backward()) == {
        "mambaprune_cpu::scan_forward", "mambaprune_cpu::scan_backward"}
    for forced in ("sequential", "reference"):
        monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", forced)
        assert chosen_scan_impl(args["u"]) == forced
        assert _kernels_run(lambda: selective_scan(**args).sum().backward()) == set()


def test_opcheck_of_the_kernel_ops():
    args = inputs(groups=2, extras=True, channels_last=True)
    kernel_args = tuple(positional(dict(args, gap=args["gap"].float())))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mambaprune_cpu.scan_forward.default, kernel_args, test_utils=checks)
    grad_out = torch.randn(2, 12, 9)
    torch.library.opcheck(torch.ops.mambaprune_cpu.scan_backward.default, (grad_out, *kernel_args), test_utils=checks)
