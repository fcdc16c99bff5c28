"""Tests of the Triton selective scan: the kernel against the reference, and its op
``mambaprune::selective_scan_triton`` (a torch.library.triton_op) under export, compile tracing,
autograd and the dispatch of ``mambaprune::selective_scan``.

Without a GPU the kernel runs in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is first imported; pytest has already imported it, so those cases run in subprocesses
that report what they measured as JSON. Fake-tensor behaviour (shapes, export graphs, compile tracing)
needs no kernel run and is tested in process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from scan_inputs import inputs, positional

from mambaprune.runtime import scan_triton, selective_scan

REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_OP = torch.ops.mambaprune.selective_scan_triton.default
SCAN_OP = torch.ops.mambaprune.selective_scan.default


KERNEL_SCRIPT = r"""
import json, torch
from scan_inputs import inputs, positional
from mambaprune.runtime import selective_scan, selective_scan_reference, selective_scan_triton

cases = {
    "fp32_plain": inputs(),
    "fp32_all_options_grouped_channels_last": inputs(groups=3, extras=True, channels_last=True),
    "fp32_float_gap_dstate_16_odd_dim": dict(inputs(dim=37, dstate=16, extras=True), gap=torch.rand(2, 9) * 3 + 1),
    "fp32_gap_only_L300_spans_reference_chunks": inputs(batch=1, dim=8, length=300, gap=True),
    "fp32_D_z_without_bias_or_softplus": inputs(groups=2, D=True, z=True, gap=True),
    "fp32_bias_softplus_without_D_z": inputs(delta_bias=True, delta_softplus=True),
    "bf16_all_options": inputs(torch.bfloat16, groups=2, extras=True, channels_last=True),
    "fp16_all_options": inputs(torch.float16, extras=True),
    "fp16_gap_only": inputs(torch.float16, dim=20, length=23, gap=True),
}
report = {}
for name, args in cases.items():
    got = selective_scan_triton(**args, block_d=8)
    direct = torch.ops.mambaprune.selective_scan_triton(*positional(args))  # default block_d=32
    via_op = selective_scan(**args)  # MAMBAPRUNE_SCAN_IMPL=triton routes the op to the kernel
    expected = selective_scan_reference(**args)
    report[name] = dict(
        err=(got.float() - expected.float()).abs().max().item(),
        direct_err=(direct.float() - expected.float()).abs().max().item(),
        op_err=(via_op.float() - got.float()).abs().max().item(),
        scale=expected.float().abs().max().item(),
        dtype_ok=all(t.dtype == args["u"].dtype for t in (got, direct, via_op)),
        contiguous=all(t.is_contiguous() and t.shape == args["u"].shape for t in (got, direct, via_op)),
    )
print("REPORT" + json.dumps(report))
"""

OP_SCRIPT = r"""
import json, torch
from scan_inputs import inputs, positional
from torch.utils.flop_counter import FlopCounterMode
from mambaprune.runtime import selective_scan, selective_scan_macs, selective_scan_reference

report = {}
names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
TRITON_OP = torch.ops.mambaprune.selective_scan_triton.default

# Which ops run: mambaprune::selective_scan dispatches to the triton op when the impl is triton.
def ops_run(impl):
    import os
    os.environ["MAMBAPRUNE_SCAN_IMPL"] = impl
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        selective_scan(**inputs(extras=True))
    os.environ["MAMBAPRUNE_SCAN_IMPL"] = "triton"
    return sorted({e.name for e in prof.events() if e.name.startswith("mambaprune::")})
report["ops_run"] = {impl: ops_run(impl) for impl in ("triton", "reference")}

# Autograd: the op's backward (differentiated reference) and the triton op called directly.
args = inputs(groups=2, extras=True)
theirs = {k: v.clone().requires_grad_() if k in names else v for k, v in args.items()}
selective_scan_reference(**theirs).square().sum().backward()
grad_err = {}
for label, call in (("op", lambda a: selective_scan(**a)),
                    ("op_overload", lambda a: torch.ops.mambaprune.selective_scan(*positional(a))),
                    ("triton_op", lambda a: torch.ops.mambaprune.selective_scan_triton(*positional(a), 8))):
    ours = {k: v.clone().requires_grad_() if k in names else v for k, v in args.items()}
    call(ours).square().sum().backward()
    grad_err[label] = {k: (ours[k].grad - theirs[k].grad).abs().max().item()
                       / max(1.0, theirs[k].grad.abs().max().item()) for k in names}
report["grad_err"] = grad_err

# torch.export of a module calling the triton op: one node, and the exported program runs the kernel.
class Direct(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(-(torch.rand(12, 5) + 0.1))
        self.D = torch.nn.Parameter(torch.randn(12))

    def forward(self, u, delta, B, C, gap):
        y = torch.ops.mambaprune.selective_scan_triton(u, delta, self.A, B, C, self.D, u, None, True, gap, 8)
        return y * 2 + 1

def call_args(batch, seed):
    a = inputs(batch=batch, seed=seed, gap=True)
    return (a["u"], a["delta"], a["B"], a["C"], a["gap"])

batch = torch.export.Dim("batch", min=2, max=64)
model = Direct()
exported = torch.export.export(model, call_args(2, 0), dynamic_shapes=[{0: batch}] * 5, strict=False)
targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
other = call_args(5, 1)
report["export"] = dict(
    triton_nodes=targets.count(TRITON_OP),
    other_targets=sorted(str(t) for t in targets if t is not TRITON_OP),
    run_err=(exported.module()(*other) - model(*other)).abs().max().item(),
    eager_vs_reference=(model(*other) - (2 * selective_scan_reference(other[0], other[1], model.A, other[2],
                        other[3], model.D, other[0], None, True, other[4]) + 1)).abs().max().item(),
)

# opcheck: schema, autograd registration, fake kernel vs the real run. Not test_aot_dispatch_*:
# AOTAutograd runs the op's body on fake tensors, which an interpreted kernel cannot take.
a = inputs(groups=2, extras=True, channels_last=True)
a["u"] = a["u"].requires_grad_()
report["opcheck"] = torch.library.opcheck(
    TRITON_OP, (*positional(a), 8), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

# FlopCounterMode counts the triton op like the scan op.
a = inputs(D=True, z=True)
with FlopCounterMode(display=False) as counter:
    torch.ops.mambaprune.selective_scan_triton(*positional(a))
report["flops"] = dict(counted=counter.get_total_flops(),
                       expected=2 * selective_scan_macs(tuple(a["u"].shape), tuple(a["A"].shape), True, True))
print("REPORT" + json.dumps(report))
"""
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}  # bf16/fp16 relative to the output scale


def _run_interpreted(script: str) -> dict:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "MAMBAPRUNE_SCAN_IMPL": "triton",
        # the repository for mambaprune, tests/ for scan_inputs
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    # About 10 s of CPU each; the generous limit is for a loaded machine.
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


@pytest.fixture(scope="module")
def interpreter_report():
    return _run_interpreted(KERNEL_SCRIPT)


@pytest.fixture(scope="module")
def op_report():
    return _run_interpreted(OP_SCRIPT)


@pytest.mark.parametrize("case", [
    "fp32_plain",
    "fp32_all_options_grouped_channels_last",
    "fp32_float_gap_dstate_16_odd_dim",
    "fp32_gap_only_L300_spans_reference_chunks",
    "fp32_D_z_without_bias_or_softplus",
    "fp32_bias_softplus_without_D_z",
    "bf16_all_options",
    "fp16_all_options",
    "fp16_gap_only",
])
def test_interpreted_kernel_matches_reference(interpreter_report, case):
    result = interpreter_report[case]
    assert result["dtype_ok"] and result["contiguous"]
    assert result["op_err"] == 0.0
    precision = case.split("_")[0]
    bound = TOLERANCE[precision] * (1.0 if precision == "fp32" else max(1.0, result["scale"]))
    assert result["err"] <= bound, result
    assert result["direct_err"] <= bound, result


def test_scan_op_dispatches_to_the_triton_op(op_report):
    assert op_report["ops_run"] == {
        "triton": ["mambaprune::selective_scan", "mambaprune::selective_scan_triton"],
        "reference": ["mambaprune::selective_scan"],
    }


@pytest.mark.parametrize("call", ["op", "op_overload", "triton_op"])
def test_interpreted_backward_matches_reference_autograd(op_report, call):
    errors = op_report["grad_err"][call]
    assert sorted(errors) == sorted(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])
    assert max(errors.values()) <= 1e-4, errors


def test_interpreted_export_keeps_the_triton_op_as_one_node_and_runs_it(op_report):
    result = op_report["export"]
    assert result["triton_nodes"] == 1
    assert result["other_targets"] == ["aten.add.Tensor", "aten.mul.Tensor"]
    assert result["run_err"] <= 1e-6
    assert result["eager_vs_reference"] <= 1e-4


def test_interpreted_opcheck_of_schema_autograd_and_fake_kernel(op_report):
    assert op_report["opcheck"] == {"test_schema": "SUCCESS", "test_autograd_registration": "SUCCESS",
                                    "test_faketensor": "SUCCESS"}


def test_flop_counter_counts_the_triton_op(op_report):
    assert op_report["flops"]["counted"] == op_report["flops"]["expected"] > 0


# ----------------------------------------------------------------------------- in process, no kernel run


def test_fake_kernel_gives_a_contiguous_output_like_u():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = inputs(torch.bfloat16, groups=3, extras=True, channels_last=True, batch=3, length=11)
        assert not args["u"].is_contiguous()
        out = TRITON_OP(*positional(args))
    assert out.shape == (3, 12, 11) and out.dtype == torch.bfloat16 and out.is_contiguous()
    meta = TRITON_OP(*positional(inputs(device="meta", batch=4, length=7)))
    assert meta.device.type == "meta" and meta.shape == (4, 12, 7)


class CallsTritonOp(torch.nn.Module):
    def forward(self, u, delta, A, B, C, gap):
        return TRITON_OP(u, delta, A, B, C, None, None, None, False, gap, 32).relu()


def test_export_keeps_the_triton_op_as_one_node_with_dynamic_batch():
    # Export traces with fake tensors: no kernel runs, so this needs neither a GPU nor the interpreter.
    args = inputs(gap=True, batch=3, length=10)
    example = (args["u"], args["delta"], args["A"], args["B"], args["C"], args["gap"])
    batch = torch.export.Dim("batch", min=2, max=64)
    dynamic = ({0: batch}, {0: batch}, None, {0: batch}, {0: batch}, {0: batch})
    exported = torch.export.export(CallsTritonOp(), example, dynamic_shapes=dynamic, strict=False)
    nodes = [n for n in exported.graph.nodes if n.op == "call_function"]
    assert [n.target for n in nodes] == [TRITON_OP, torch.ops.aten.relu.default]
    value = nodes[0].meta["val"]
    assert isinstance(value.shape[0], torch.SymInt) and tuple(value.shape[1:]) == (12, 10)
    assert value.dtype == torch.float32


def test_scan_op_export_with_triton_forced_is_still_one_scan_node(monkeypatch):
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "triton")

    class CallsScan(torch.nn.Module):
        def forward(self, u, delta, A, B, C):
            return selective_scan(u, delta, A, B, C, delta_softplus=True)

    args = inputs(batch=2)
    exported = torch.export.export(CallsScan(), tuple(args.values()), strict=False)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [SCAN_OP]


def test_compile_tracing_sees_the_kernel_itself():
    """What torch.compile's AOTAutograd does to a triton_op: under FunctionalTensorMode the op
    decomposes into Triton's kernel-wrapper node for our kernel, which Inductor then schedules.
    Meta tensors: no device and no kernel run (without a driver, Triton's mutation analysis falls
    back to assuming every argument is written, and logs so)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def scan_plus_one(u, delta, A, B, C, gap):
        return TRITON_OP(u, delta, A, B, C, None, None, None, True, gap, 16) + 1

    args = inputs(device="meta", gap=True, dim=40)
    graph = make_fx(dispatch_functionalize(scan_plus_one), tracing_mode="symbolic")(
        args["u"], args["delta"], args["A"], args["B"], args["C"], args["gap"])
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert TRITON_OP not in targets
    wrappers = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(wrappers) == 1
    launch = wrappers[0].kwargs
    assert kernel_side_table.get_kernel(launch["kernel_idx"]) is scan_triton._selective_scan_fwd_kernel
    assert launch["kwargs"]["SOFTPLUS"] is True and launch["kwargs"]["HAS_GAP"] is True
    assert launch["kwargs"]["BLOCK_D"] == 16 and launch["kwargs"]["BLOCK_N"] == 8


def test_triton_on_cpu_tensors_without_the_interpreter_says_what_to_do(monkeypatch):
    args = inputs()
    with pytest.raises(ValueError, match="needs GPU tensors.*MAMBAPRUNE_SCAN_IMPL=reference or sequential"):
        TRITON_OP(*positional(args))
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "triton")
    with pytest.raises(ValueError, match="needs GPU tensors"):
        selective_scan(**args)


# ----------------------------------------------------------------------------- CUDA


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    batch, dim, dstate, length = 4, 96, 16, 197
    u = torch.randn(batch, length, dim, generator=g).transpose(1, 2)
    args = dict(u=u, delta=torch.rand(batch, dim, length, generator=g) * 0.5,
                A=-(torch.rand(dim, dstate, generator=g) + 0.1),
                B=torch.randn(batch, 2, dstate, length, generator=g), C=torch.randn(batch, 2, dstate, length, generator=g),
                D=torch.randn(dim, generator=g), z=torch.randn(batch, dim, length, generator=g),
                delta_bias=torch.randn(dim, generator=g) * 0.3, delta_softplus=True,
                gap=torch.randint(1, 5, (batch, length), generator=g))
    return {k: v.to("cuda", dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
            else (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


@needs_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_kernel_matches_reference(dtype, tolerance, monkeypatch):
    monkeypatch.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    from mambaprune.runtime import chosen_scan_impl, selective_scan_reference

    args = _cuda_inputs(dtype)
    assert chosen_scan_impl(args["u"]) == "triton"
    got = selective_scan(**args)
    expected = selective_scan_reference(**args)
    assert got.dtype == dtype and got.is_contiguous()
    scale = max(1.0, expected.float().abs().max().item()) if dtype != torch.float32 else 1.0
    assert (got.float() - expected.float()).abs().max().item() <= tolerance * scale


@needs_cuda
def test_cuda_torch_compile_inlines_the_kernel_and_keeps_the_scan_op(monkeypatch):
    monkeypatch.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    from torch._inductor.utils import run_and_get_code

    from mambaprune.runtime import selective_scan_reference

    args = _cuda_inputs(torch.float32)
    expected = selective_scan_reference(**args)
    torch._dynamo.reset()
    direct, code = run_and_get_code(torch.compile(lambda a: TRITON_OP(*positional(a)) * 2, fullgraph=True), args)
    assert (direct - 2 * expected).abs().max().item() <= 2e-4
    assert "_selective_scan_fwd_kernel" in "\n".join(code)  # Inductor launches our kernel itself
    via_op = torch.compile(lambda a: selective_scan(**a) * 2, fullgraph=True)(args)
    assert (via_op - 2 * expected).abs().max().item() <= 2e-4


@needs_cuda
def test_cuda_backward_and_export(monkeypatch):
    monkeypatch.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    from mambaprune.runtime import selective_scan_reference

    args = _cuda_inputs(torch.float32)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    theirs = {k: v.clone().requires_grad_() if k in names else v for k, v in args.items()}
    selective_scan_reference(**theirs).square().sum().backward()
    for call in (lambda a: selective_scan(**a), lambda a: TRITON_OP(*positional(a))):
        ours = {k: v.clone().requires_grad_() if k in names else v for k, v in args.items()}
        call(ours).square().sum().backward()
        for name in names:
            torch.testing.assert_close(ours[name].grad, theirs[name].grad, atol=1e-3, rtol=1e-3, msg=name)

    example = (args["u"], args["delta"], args["A"], args["B"], args["C"], args["gap"])
    exported = torch.export.export(CallsTritonOp(), example, strict=False)
    assert [n.target for n in exported.graph.nodes if n.op == "call_function"] == [TRITON_OP,
                                                                                    torch.ops.aten.relu.default]
    torch.testing.assert_close(exported.module()(*example), CallsTritonOp()(*example))


@needs_cuda
def test_cuda_opcheck_including_the_compile_path():
    # test_aot_dispatch_* traces the op the way torch.compile does (through wrap_triton).
    args = inputs(groups=2, extras=True, channels_last=True, device="cuda")
    args["u"] = args["u"].requires_grad_()
    torch.library.opcheck(TRITON_OP, (*positional(args), 8))
