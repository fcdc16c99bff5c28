"""Tests of mambaprune::selective_scan: reference vs a per-token loop, autograd, export, FLOPs, validation."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaprune.runtime import (
    chosen_scan_impl,
    pos_conv1d,
    selective_scan,
    selective_scan_macs,
    selective_scan_reference,
)
from mambaprune.runtime.scan_sequential import selective_scan_sequential
from scan_inputs import naive_scan


def make_inputs(batch=2, dim=6, dstate=4, length=37, groups=None, dtype=torch.float32, seed=0, **extras):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    inputs = dict(
        u=randn(batch, dim, length),
        delta=(torch.rand(batch, dim, length, generator=g) * 0.5).to(dtype),
        A=-(torch.rand(dim, dstate, generator=g) + 0.1).to(dtype),
    )
    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    inputs["B"], inputs["C"] = randn(*bc_shape), randn(*bc_shape)
    if extras.get("with_D"):
        inputs["D"] = randn(dim)
    if extras.get("with_z"):
        inputs["z"] = randn(batch, dim, length)
    if extras.get("with_bias"):
        inputs["delta_bias"] = randn(dim) * 0.3
        inputs["delta_softplus"] = True
    if extras.get("with_gap"):
        inputs["gap"] = torch.randint(1, 5, (batch, length), generator=g)
    return inputs


CASES = {
    "plain": {},
    "grouped": {"groups": 3},
    "gate_z": {"with_z": True},
    "bias_softplus": {"with_bias": True},
    "skip_D": {"with_D": True},
    "gap": {"with_gap": True},
    "everything_grouped_gap": {"groups": 2, "with_z": True, "with_bias": True, "with_D": True, "with_gap": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_per_token_loop(case):
    inputs = make_inputs(**CASES[case])
    expected = naive_scan(**inputs)
    got = selective_scan(**inputs)
    assert got.dtype == torch.float32 and got.shape == expected.shape and got.is_contiguous()
    assert (got.double() - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("length", [1, 15, 16, 17, 50])
def test_lengths_around_chunk_boundaries(length):
    inputs = make_inputs(length=length, with_gap=True)
    expected = naive_scan(**inputs)
    for chunk_size in (4, 16, 64):
        got = selective_scan_reference(**inputs, chunk_size=chunk_size)
        assert (got.double() - expected).abs().max() <= 1e-5


def test_gap_of_ones_is_the_plain_scan():
    inputs = make_inputs(with_D=True, with_bias=True)
    plain = selective_scan(**inputs)
    for ones in (torch.ones(2, 37, dtype=torch.int64), torch.ones(2, 37)):
        assert torch.equal(selective_scan(**inputs, gap=ones), plain)


def test_transposed_channels_last_input_is_accepted():
    inputs = make_inputs(with_D=True)
    channels_last = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not channels_last.is_contiguous()
    assert torch.equal(selective_scan(**{**inputs, "u": channels_last}), selective_scan(**inputs))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_inputs_give_output_in_that_dtype(dtype, tolerance):
    inputs = make_inputs(with_D=True, with_z=True, with_bias=True, with_gap=True)
    low = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    got = selective_scan(**low)
    # The fp32 result on the same (rounded) inputs isolates the output rounding.
    expected = selective_scan(**{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                 for k, v in low.items()})
    assert got.dtype == dtype
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() <= tolerance * max(1.0, float(scale))


@pytest.mark.parametrize("scan", [selective_scan, selective_scan_sequential], ids=["op", "sequential"])
@pytest.mark.parametrize("with_gap", [False, True])
def test_gradcheck_all_differentiable_arguments(with_gap, scan):
    inputs = make_inputs(batch=2, dim=4, dstate=3, length=19, groups=2, dtype=torch.float64,
                         with_D=True, with_z=True, with_bias=True, with_gap=with_gap)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    tensors = tuple(inputs[name].requires_grad_() for name in names)

    def run(*args):
        return scan(**dict(zip(names, args)), delta_softplus=True, gap=inputs.get("gap"))

    assert torch.autograd.gradcheck(run, tensors, eps=1e-6, atol=1e-5)


def test_backward_matches_reference_autograd_in_float32():
    inputs = make_inputs(with_D=True, with_bias=True)
    u = inputs["u"].clone().requires_grad_()
    selective_scan(**{**inputs, "u": u}).square().sum().backward()
    u_ref = inputs["u"].clone().requires_grad_()
    selective_scan_reference(**{**inputs, "u": u_ref}).square().sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad)


class TinyMixer(torch.nn.Module):
    """conv1d over kept tokens, then a gated scan: the shape of a pruned Mamba mixer."""

    def __init__(self, dim=8, dstate=4, width=4):
        super().__init__()
        self.conv_weight = torch.nn.Parameter(torch.randn(dim, 1, width))
        self.conv_bias = torch.nn.Parameter(torch.randn(dim))
        self.A = torch.nn.Parameter(-torch.rand(dim, dstate))
        self.D = torch.nn.Parameter(torch.randn(dim))
        self.width = width

    def forward(self, hidden, B, C, pos):
        x = hidden.transpose(1, 2)  # (batch, L, D) -> (batch, D, L) view
        x = pos_conv1d(x, self.conv_weight, self.conv_bias, pos, self.width - 1)
        return selective_scan(x, x.sigmoid(), self.A, B, C, D=self.D, z=x, delta_softplus=True)


def _tiny_mixer_inputs(batch=3, length=10, dim=8, dstate=4):
    pos = torch.stack([torch.randperm(20)[:length].sort().values for _ in range(batch)])
    return (torch.randn(batch, length, dim), torch.randn(batch, dstate, length), torch.randn(batch, dstate, length), pos)


def test_export_keeps_scan_and_conv_as_single_nodes_with_dynamic_batch():
    model = TinyMixer()
    inputs = _tiny_mixer_inputs()
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, inputs, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}),
                                   strict=False)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.mambaprune.selective_scan.default) == 1
    assert targets.count(torch.ops.mambaprune.pos_conv1d.default) == 1
    other = _tiny_mixer_inputs(batch=5)
    torch.testing.assert_close(exported.module()(*other), model(*other))


def test_flop_counter_counts_twice_the_documented_macs():
    batch, dim, dstate, length = 2, 6, 4, 37
    cases = [({}, 9 * batch * length * dim * dstate),
             ({"with_D": True}, 9 * batch * length * dim * dstate + batch * dim * length),
             ({"with_D": True, "with_z": True, "with_gap": True},
              9 * batch * length * dim * dstate + 2 * batch * dim * length)]
    for extras, macs in cases:
        inputs = make_inputs(batch, dim, dstate, length, **extras)
        with FlopCounterMode(display=False) as counter:
            selective_scan(**inputs)
        assert counter.get_total_flops() == 2 * macs
        assert selective_scan_macs((batch, dim, length), (dim, dstate), "D" in inputs, "z" in inputs) == macs


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequential_scan_matches_per_token_loop(case):
    inputs = make_inputs(**CASES[case])
    expected = naive_scan(**inputs)
    torch.testing.assert_close(selective_scan_sequential(**inputs).double(), expected, atol=2e-5, rtol=1e-5)


def test_op_backward_through_the_sequential_path_matches_reference_autograd(monkeypatch):
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "sequential")
    inputs = make_inputs(groups=2, with_D=True, with_z=True, with_bias=True, with_gap=True)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    theirs = {k: v.clone().requires_grad_() if k in names else v for k, v in inputs.items()}
    selective_scan_reference(**theirs).square().sum().backward()
    # selective_scan (eager training calls the sequential Function directly) and the op itself
    # (its registered backward differentiates the sequential scan)
    for call in (lambda a: selective_scan(**a), lambda a: torch.ops.mambaprune.selective_scan(
            *(a[k] for k in names), True, a["gap"])):
        ours = {k: v.clone().requires_grad_() if k in names else v for k, v in inputs.items()}
        call(ours).square().sum().backward()
        for name in names:
            torch.testing.assert_close(ours[name].grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_implementation_choice_without_the_cpp_kernels_and_override(monkeypatch):
    """The pure-PyTorch crossover (what runs when the C++ kernels cannot be built) and the override;
    test_scan_cpp.py covers the choice when they are built."""
    import sys

    # the module, which the package's selective_scan function shadows
    monkeypatch.setattr(sys.modules["mambaprune.runtime.selective_scan"], "load_cpu_kernels", lambda: None)
    u = torch.randn(1, 2, 3)
    monkeypatch.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    assert chosen_scan_impl(u) == "reference"
    assert chosen_scan_impl(torch.randn(8, 384, 3), dstate=16) == "sequential"
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "cpp")  # forced but unavailable: the fallback's choice
    assert chosen_scan_impl(u) == "reference"
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "sequential")
    assert chosen_scan_impl(u) == "sequential"
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "triton")
    assert chosen_scan_impl(u) == "triton"
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="MAMBAPRUNE_SCAN_IMPL"):
        chosen_scan_impl(u)


# ----------------------------------------------------------------------------- validation


def _vim_inputs():
    return make_inputs(batch=2, dim=768, dstate=16, length=197)


def test_length_mismatch_names_argument_and_expected_shape():
    inputs = _vim_inputs()
    inputs["B"] = inputs["B"][..., :196]
    expected = (r"selective_scan: B must have shape \(batch, N, L\) = \(2, 16, 197\) or \(batch, G, N, L\) "
                r"with G dividing D=768; got \(2, 16, 196\)")
    with pytest.raises(ValueError, match=expected):
        selective_scan(**inputs)


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("u", torch.randn(2, 6), r"u must have shape \(batch, D, L\) \(3 dims\); got \(2, 6\)"),
        ("delta", torch.randn(2, 6, 36), r"delta must have shape \(batch, D, L\) = \(2, 6, 37\); got \(2, 6, 36\)"),
        ("A", torch.randn(5, 4), r"A must have shape \(D, N\) with D=6; got \(5, 4\)"),
        ("C", torch.randn(2, 4, 4, 37), r"C must have shape .* with G dividing D=6; got \(2, 4, 4, 37\)"),
        ("D", torch.randn(7), r"D must have shape \(D,\) = \(6,\); got \(7,\)"),
        ("z", torch.randn(2, 6, 37, 1), r"z must have shape \(batch, D, L\) = \(2, 6, 37\)"),
        ("delta_bias", torch.randn(6, 1), r"delta_bias must have shape \(D,\) = \(6,\)"),
        ("gap", torch.ones(2, 36), r"gap must have shape \(batch, L\) = \(2, 37\); got \(2, 36\)"),
    ],
)
def test_wrong_shapes_raise(name, bad, message):
    inputs = make_inputs()
    inputs[name] = bad
    with pytest.raises(ValueError, match="selective_scan: " + message):
        selective_scan(**inputs)


def test_wrong_dtype_raises():
    inputs = make_inputs()
    inputs["u"] = inputs["u"].long()
    with pytest.raises(ValueError, match="u must be a floating-point tensor; got dtype torch.int64"):
        selective_scan(**inputs)
    inputs = make_inputs()
    inputs["gap"] = torch.ones(2, 37, dtype=torch.bool)
    with pytest.raises(ValueError, match="gap must be a real floating-point or integer tensor"):
        selective_scan(**inputs)


def test_device_mismatch_raises():
    inputs = make_inputs()
    inputs["C"] = inputs["C"].to("meta")
    with pytest.raises(ValueError, match=r"on the device of u \(cpu\); C is on meta"):
        selective_scan(**inputs)


@pytest.mark.parametrize("case", ["plain", "everything_grouped_gap"])
def test_opcheck_fake_kernel_and_autograd_registration(case):
    inputs = make_inputs(batch=2, dim=4, dstate=3, length=9, **CASES[case])
    inputs["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    order = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "gap"]
    args = tuple(inputs.get(name, False if name == "delta_softplus" else None) for name in order)
    torch.library.opcheck(torch.ops.mambaprune.selective_scan.default, args)


def test_triton_kernel_without_triton_names_the_missing_package(monkeypatch):
    from mambaprune.errors import MissingDependencyError
    from mambaprune.runtime import scan_triton

    monkeypatch.setattr(scan_triton, "triton", None)
    u = torch.randn(1, 4, 5)
    with pytest.raises(MissingDependencyError, match=r"triton.*mambaprune\[gpu\]"):
        scan_triton.selective_scan_triton(u, u.abs(), -torch.ones(4, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5))


WITHOUT_TRITON_SCRIPT = r"""
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a CPU-only install
import json, os, torch
import mambaprune
from mambaprune.errors import MissingDependencyError
from mambaprune.runtime import selective_scan, selective_scan_reference, triton_available

g = torch.Generator().manual_seed(0)
u = torch.randn(2, 4, 7, generator=g)
args = (u, u.abs(), -torch.ones(4, 3), torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g))
report = dict(available=triton_available(), triton_modules=sorted(m for m in sys.modules if m.startswith("triton")))
report["cpu_ok"] = bool((selective_scan(*args) - selective_scan_reference(*args)).abs().max() <= 1e-5)

class CallsTritonOp(torch.nn.Module):
    def forward(self, *a):
        return torch.ops.mambaprune.selective_scan_triton(*a, None, None, None, False, None, 32)

exported = torch.export.export(CallsTritonOp(), args, strict=False)  # the op exists, with its fake kernel
report["export_targets"] = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]


def error_of(call):
    try:
        call()
    except MissingDependencyError as error:
        return str(error)

report["errors"] = {"triton_op": error_of(lambda: torch.ops.mambaprune.selective_scan_triton(*args))}
os.environ["MAMBAPRUNE_SCAN_IMPL"] = "triton"
report["errors"]["forced"] = error_of(lambda: selective_scan(*args))
print("REPORT" + json.dumps(report))
"""


def test_without_triton_the_core_works_and_forcing_triton_names_the_package():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MAMBAPRUNE_SCAN_IMPL", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("REPORT"))[len("REPORT"):])
    assert report["available"] is False and report["triton_modules"] == ["triton"]  # the blocked entry only
    assert report["cpu_ok"]
    assert report["export_targets"] == ["mambaprune.selective_scan_triton.default"]
    assert sorted(report["errors"]) == ["forced", "triton_op"]
    for label, message in report["errors"].items():
        assert message is not None and "'triton'" in message and "mambaprune[gpu]" in message, label
