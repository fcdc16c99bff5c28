"""Tests of the Triton SSD scan (``mambaprune::ssd_scan_triton``): the kernel against the direct token
loop in Triton's interpreter, the op's dispatch, backward, export, opcheck and FLOPs; compile tracing
on meta tensors; the CUDA kernel where a GPU exists.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported; pytest has
already imported it, so those cases run in a subprocess that reports what it measured as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from ssd_inputs import SSD_GRAD_NAMES, ssd_inputs, ssd_positional

from mambaprune.runtime import ssd_reference, ssd_scan, ssd_triton

REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_OP = torch.ops.mambaprune.ssd_scan_triton.default
SSD_OP = torch.ops.mambaprune.ssd_scan.default

SCRIPT = r"""
import json, torch
from torch.utils.flop_counter import FlopCounterMode
from ssd_inputs import SSD_GRAD_NAMES, ssd_inputs, ssd_positional
from mambaprune.runtime import ssd_scan, ssd_scan_macs, ssd_scan_reference
from mambaprune.runtime.ssd_triton import ssd_scan_triton

TRITON_OP = torch.ops.mambaprune.ssd_scan_triton.default
every = dict(D="channel", z=True, dt_bias=True, dt_softplus=True, gap=True)
cases = {
    "fp32_plain": ssd_inputs(),
    "fp32_every_option_views": ssd_inputs(views=True, **every),
    "fp32_D_per_head_one_group_odd_headdim": ssd_inputs(heads=3, headdim=37, groups=1, dstate=16, D="head", z=True),
    "fp32_gap_bias_without_softplus": ssd_inputs(groups=2, dt_bias=True, gap=True),
    "bf16_every_option": ssd_inputs(torch.bfloat16, **every),
    "fp16_every_option_views": ssd_inputs(torch.float16, views=True, **every),
}
report = {"kernel": {}}
for name, args in cases.items():
    got = ssd_scan_triton(**args, block_p=4)
    via_op = ssd_scan(**args)  # MAMBAPRUNE_SCAN_IMPL=triton routes the op to the kernel (block_p 32)
    expected = ssd_scan_reference(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                      for k, v in args.items()})
    report["kernel"][name] = dict(
        err=(got.double() - expected).abs().max().item(),
        op_err=(via_op.double() - expected).abs().max().item(),
        scale=expected.abs().max().item(),
        ok=all(t.dtype == args["x"].dtype and t.is_contiguous() and t.shape == args["x"].shape for t in (got, via_op)),
    )

# Backward of the op and of the triton op called directly, against autograd through the token loop.
args = ssd_inputs(groups=2, **every)
theirs = {k: v.detach().double().requires_grad_() if k in SSD_GRAD_NAMES else v for k, v in args.items()}
ssd_scan_reference(**theirs).square().sum().backward()
report["grad_err"] = {}
for label, call in (("op", lambda a: ssd_scan(**a)), ("triton_op", lambda a: TRITON_OP(*ssd_positional(a), 4))):
    ours = {k: v.detach().clone().requires_grad_() if k in SSD_GRAD_NAMES else v for k, v in args.items()}
    call(ours).square().sum().backward()
    report["grad_err"][label] = {k: (ours[k].grad.double() - theirs[k].grad).abs().max().item()
                                 / max(1.0, theirs[k].grad.abs().max().item()) for k in SSD_GRAD_NAMES}

# torch.export of a module calling the triton op: one node, and the exported program runs the kernel.
class Direct(torch.nn.Module):
    def forward(self, x, dt, A, B, C, gap):
        return TRITON_OP(x, dt, A, B, C, None, x, None, True, gap, 4) * 2

def call_args(batch, seed):
    a = ssd_inputs(batch=batch, seed=seed, gap=True)
    return (a["x"], a["dt"], a["A"], a["B"], a["C"], a["gap"])

batch = torch.export.Dim("batch", min=2, max=64)
exported = torch.export.export(Direct(), call_args(2, 0), dynamic_shapes=[{0: batch}, {0: batch}, None, {0: batch},
                               {0: batch}, {0: batch}], strict=False)
targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
other = call_args(5, 1)
report["export"] = dict(triton_nodes=targets.count(TRITON_OP),
                        run_err=(exported.module()(*other) - Direct()(*other)).abs().max().item())

# opcheck: schema, autograd registration, fake kernel (not the aot_dispatch tests: AOTAutograd runs the
# op's body on fake tensors, which an interpreted kernel cannot take).
a = ssd_inputs(groups=2, views=True, **every)
a["x"] = a["x"].requires_grad_()
torch.library.opcheck(TRITON_OP, (*ssd_positional(a), 4),
                      test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
report["opcheck"] = True

a = ssd_inputs(D="head", z=True)
with FlopCounterMode(display=False) as counter:
    TRITON_OP(*ssd_positional(a))
report["flops"] = dict(counted=counter.get_total_flops(),
                       expected=2 * ssd_scan_macs(tuple(a["x"].shape), tuple(a["B"].shape), True, True))
print("REPORT" + json.dumps(report))
"""
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3}  # relative to the output scale once it exceeds 1


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TRITON_INTERPRET": "1", "MAMBAPRUNE_SCAN_IMPL": "triton",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("case", ["fp32_plain", "fp32_every_option_views", "fp32_D_per_head_one_group_odd_headdim",
                                  "fp32_gap_bias_without_softplus", "bf16_every_option", "fp16_every_option_views"])
def test_interpreted_kernel_matches_the_token_loop(report, case):
    measured = report["kernel"][case]
    limit = TOLERANCE[case[:4]] * max(1.0, measured["scale"])
    assert measured["ok"] and measured["err"] <= limit and measured["op_err"] <= limit


def test_interpreted_backward_of_both_ops_matches_autograd_through_the_token_loop(report):
    for label, errors in report["grad_err"].items():
        assert set(errors) == set(SSD_GRAD_NAMES)
        assert max(errors.values()) <= 1e-4, (label, errors)


def test_interpreted_export_opcheck_and_flops(report):
    assert report["export"]["triton_nodes"] == 1 and report["export"]["run_err"] <= 1e-6
    assert report["opcheck"] is True
    assert report["flops"]["counted"] == report["flops"]["expected"] > 0


def test_ssd_op_export_with_triton_forced_is_still_one_ssd_node(monkeypatch):
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "triton")

    class CallsSsd(torch.nn.Module):
        def forward(self, x, dt, A, B, C):
            return ssd_scan(x, dt, A, B, C, dt_softplus=True)

    args = ssd_inputs()
    exported = torch.export.export(CallsSsd(), tuple(args[k] for k in ("x", "dt", "A", "B", "C")), strict=False)
    assert [n.target for n in exported.graph.nodes if n.op == "call_function"] == [SSD_OP]


def test_compile_tracing_sees_the_kernel_itself():
    """Under AOTAutograd's functionalization the triton op becomes Triton's kernel-wrapper node for our
    kernel (what Inductor schedules); meta tensors, so no device and no kernel run."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def ssd_plus_one(x, dt, A, B, C, gap):
        return TRITON_OP(x, dt, A, B, C, None, None, None, True, gap, 16) + 1

    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in ssd_inputs(headdim=40, gap=True).items()}
    graph = make_fx(dispatch_functionalize(ssd_plus_one), tracing_mode="symbolic")(
        *(args[k] for k in ("x", "dt", "A", "B", "C", "gap")))
    wrappers = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(wrappers) == 1 and TRITON_OP not in [n.target for n in graph.graph.nodes]
    launch = wrappers[0].kwargs
    assert kernel_side_table.get_kernel(launch["kernel_idx"]) is ssd_triton._ssd_scan_fwd_kernel
    assert launch["kwargs"]["SOFTPLUS"] is True and launch["kwargs"]["HAS_GAP"] is True
    assert launch["kwargs"]["BLOCK_P"] == 16 and launch["kwargs"]["BLOCK_N"] == 4


def test_triton_on_cpu_tensors_without_the_interpreter_says_what_to_do():
    with pytest.raises(ValueError, match="needs GPU tensors"):
        TRITON_OP(*ssd_positional(ssd_inputs()))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_kernel_and_backward_match_the_token_loop(dtype, tolerance, monkeypatch):
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", "triton")
    args = ssd_inputs(dtype, heads=8, headdim=64, groups=2, dstate=16, length=64, views=True, D="head", z=True,
                      dt_bias=True, dt_softplus=True, gap=True)
    expected = ssd_reference.ssd_scan_reference(**{k: v.double() if isinstance(v, torch.Tensor) and
                                                   v.is_floating_point() else v for k, v in args.items()})
    on_gpu = {k: v.cuda().requires_grad_(k in SSD_GRAD_NAMES and v.is_floating_point())
              if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    got = ssd_scan(**on_gpu)
    assert float((got.double().cpu() - expected).abs().max()) <= tolerance * max(1.0, float(expected.abs().max()))
    got.float().square().sum().backward()
    assert all(on_gpu[k].grad is not None and torch.isfinite(on_gpu[k].grad).all() for k in SSD_GRAD_NAMES)
