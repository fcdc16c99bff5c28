"""Tests of the SSD (Mamba-2) scan op ``mambaprune::ssd_scan``: the C++ kernel and every other
implementation against the direct token loop for every option, the token loop against the Mamba-1
definition, gradients, opcheck, export / compile as one node, the FLOP formula, argument errors."""

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaprune import ssd_scan
from mambaprune.runtime import chosen_ssd_impl, ssd_scan_macs, ssd_scan_reference
from mambaprune.runtime.cpu_kernels import cpu_kernels_status
from mambaprune.runtime.ssd_cpp import ssd_scan_cpp
from mambaprune.runtime.ssd_reference import as_selective_scan_args, from_selective_scan_output
from scan_inputs import naive_scan
from ssd_inputs import SSD_GRAD_NAMES, ssd_inputs, ssd_positional

SSD_OP = torch.ops.mambaprune.ssd_scan.default
COMBINATIONS = [dict(D=D, z=z, dt_bias=bias, dt_softplus=softplus, gap=gap)
                for D, z, bias, softplus, gap in itertools.product([None, "head", "channel"], *[[False, True]] * 4)]


def combo_id(options):
    return "+".join(f"D={v}" if k == "D" else k for k, v in options.items() if v) or "plain"


def needs_cpp():
    status = cpu_kernels_status()
    if not status.available:
        pytest.skip(f"the C++ CPU kernels are unavailable here: {status.detail}")


def as_float64(args):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}


def max_error(got, expected) -> float:
    """Largest absolute error, relative to the output's scale once that exceeds 1."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("options", COMBINATIONS, ids=combo_id)
def test_reference_is_the_mamba1_definition_on_heads_times_headdim_channels(options, groups):
    """The token loop against the Mamba-1 float64 definition (tests/scan_inputs.naive_scan) of the
    equivalent scan: one channel per (head, channel of the head), A_h on every state."""
    args = ssd_inputs(torch.float64, groups=groups, **options)
    softplus = args.pop("dt_softplus")
    mamba1 = naive_scan(**as_selective_scan_args(**args), delta_softplus=softplus)
    expected = from_selective_scan_output(mamba1, args["x"].shape)
    torch.testing.assert_close(ssd_scan_reference(**args, dt_softplus=softplus), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("options", COMBINATIONS, ids=combo_id)
def test_cpp_kernel_matches_the_token_loop_for_every_option(options, groups):
    needs_cpp()
    args = ssd_inputs(groups=groups, **options)
    got = ssd_scan_cpp(**args)
    assert got.dtype == torch.float32 and got.shape == args["x"].shape and got.is_contiguous()
    assert max_error(got, ssd_scan_reference(**as_float64(args))) <= 1e-5


@pytest.mark.parametrize("impl", ["cpp", "sequential", "reference"])
@pytest.mark.parametrize("shape", [dict(heads=8, headdim=64, groups=2, dstate=16, length=40),
                                   dict(heads=3, headdim=37, groups=1, dstate=7, length=23),
                                   dict(heads=4, headdim=1, groups=4, dstate=1, length=5)])
def test_the_op_matches_the_token_loop_with_every_implementation_at_wide_and_odd_shapes(impl, shape, monkeypatch):
    if impl == "cpp":
        needs_cpp()
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", impl)
    args = ssd_inputs(**shape, D="channel", z=True, dt_bias=True, dt_softplus=True, gap=True, views=True)
    assert chosen_ssd_impl(args["x"]) == {"sequential": "mamba1"}.get(impl, impl)
    assert max_error(ssd_scan(**args), ssd_scan_reference(**as_float64(args))) <= 1e-5


def test_views_of_an_in_proj_output_are_read_in_place_with_the_same_bits():
    needs_cpp()
    args = ssd_inputs(D="head", z=True, dt_bias=True, dt_softplus=True, gap=True, views=True)
    assert not args["x"].is_contiguous() and not args["B"].is_contiguous()
    copies = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    assert torch.equal(ssd_scan_cpp(**args), ssd_scan_cpp(**copies))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32_and_return_their_dtype(dtype):
    args = ssd_inputs(dtype, D="head", z=True, dt_bias=True, dt_softplus=True, gap=True)
    leaves = {k: v.requires_grad_() if k in SSD_GRAD_NAMES else v for k, v in args.items()}
    y = ssd_scan(**leaves)
    expected = ssd_scan_reference(**as_float64(args))
    assert y.dtype == dtype and max_error(y, expected) <= 1e-2  # the rounding of the output alone
    y.float().sum().backward()
    assert all(leaves[k].grad.dtype == dtype for k in SSD_GRAD_NAMES if k in leaves)


@pytest.mark.parametrize("batch,length", [(0, 7), (3, 1), (2, 0)])
def test_empty_batch_and_tiny_lengths(batch, length):
    args = ssd_inputs(batch=batch, length=length, D="channel", z=True, dt_bias=True, dt_softplus=True, gap=True)
    leaves = {k: v.requires_grad_() if k in SSD_GRAD_NAMES else v for k, v in args.items()}
    y = ssd_scan(**leaves)
    assert y.shape == (batch, length, 6, 5)
    torch.testing.assert_close(y, ssd_scan_reference(**args))
    y.sum().backward()
    assert all(leaves[k].grad.shape == leaves[k].shape for k in SSD_GRAD_NAMES)


def test_default_implementation_on_the_cpu(monkeypatch):
    monkeypatch.delenv("MAMBAPRUNE_SCAN_IMPL", raising=False)
    x = torch.zeros(1, 2, 2, 2)
    assert chosen_ssd_impl(x) == ("cpp" if cpu_kernels_status().available else "mamba1")


def test_per_head_D_is_the_per_channel_D_repeated_and_gap_of_ones_is_the_plain_scan():
    args = ssd_inputs(D="head", z=True, dt_bias=True, dt_softplus=True)
    per_channel = dict(args, D=args["D"][:, None].expand(-1, args["x"].shape[3]).contiguous())
    ones = dict(args, gap=torch.ones(args["x"].shape[:2], dtype=torch.int64))
    plain = ssd_scan(**args)
    torch.testing.assert_close(ssd_scan(**per_channel), plain, atol=0, rtol=0)
    torch.testing.assert_close(ssd_scan(**ones), plain, atol=0, rtol=0)


def test_a_gap_multiplies_the_decay_exponent():
    """gap g on token t: the state decays by exp(g * dt * A) there, as g - 1 skipped tokens with the
    same dt and no input would; checked on one head, one channel, one state by hand."""
    x = torch.tensor([1.0, 2.0, -1.0]).reshape(1, 3, 1, 1)
    dt = torch.tensor([0.5, 0.25, 1.0]).reshape(1, 3, 1)
    A = torch.tensor([-0.8])
    B = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    C = torch.tensor([2.0, 1.0, 3.0]).reshape(1, 3, 1, 1)
    gap = torch.tensor([[1, 3, 2]])
    h0 = 0.5 * 1.0 * 1.0
    h1 = torch.exp(torch.tensor(3 * 0.25 * -0.8)) * h0 + 0.25 * 2.0 * -2.0
    h2 = torch.exp(torch.tensor(2 * 1.0 * -0.8)) * h1 + 1.0 * -1.0 * 0.5
    expected = torch.stack([torch.tensor(2.0 * h0), 1.0 * h1, 3.0 * h2]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, gap=gap), expected)
    torch.testing.assert_close(ssd_scan_reference(x, dt, A, B, C, gap=gap), expected)


@pytest.mark.parametrize("impl", ["cpp", "sequential", "reference"])
@pytest.mark.parametrize("options", [dict(D="head", z=True, dt_bias=True, dt_softplus=True, gap=True),
                                     dict(D="channel", dt_bias=True), dict()], ids=combo_id)
def test_gradcheck_in_float64_through_the_op(impl, options, monkeypatch):
    if impl == "cpp":
        needs_cpp()
    monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", impl)
    args = ssd_inputs(torch.float64, batch=2, length=5, heads=4, headdim=3, groups=2, dstate=2, **options)
    args = {k: v.requires_grad_() if k in SSD_GRAD_NAMES and v is not None else v for k, v in args.items()}
    assert torch.autograd.gradcheck(lambda *a: SSD_OP(*a), tuple(ssd_positional(args)), eps=1e-6, atol=1e-6)


def test_float32_gradients_match_autograd_through_the_token_loop():
    args = ssd_inputs(heads=8, headdim=20, groups=2, dstate=6, length=30, D="channel", z=True, dt_bias=True,
                      dt_softplus=True, gap=True, views=True)
    leaves = {k: v.detach().double().requires_grad_() if k in SSD_GRAD_NAMES and v is not None else v
              for k, v in args.items()}
    ssd_scan_reference(**leaves).square().sum().backward()
    ours = {k: v.detach().clone().requires_grad_() if k in SSD_GRAD_NAMES and v is not None else v
            for k, v in args.items()}
    ssd_scan(**ours).square().sum().backward()
    for name in SSD_GRAD_NAMES:
        assert ours[name].grad.shape == ours[name].shape and ours[name].grad.dtype == torch.float32
        assert max_error(ours[name].grad, leaves[name].grad) <= 1e-4, name


@pytest.mark.parametrize("D", ["head", "channel"])
def test_cpp_backward_equals_the_mamba1_route_in_float64_over_several_channel_blocks(D, monkeypatch):
    """Two analytic backwards (the SSD kernel's; the Mamba-1 kernel's pulled back through the views)
    on a head dim of 37 (five float64 vector blocks, the last partial) and 3 groups."""
    needs_cpp()
    args = ssd_inputs(torch.float64, heads=6, headdim=37, groups=3, dstate=5, length=17, D=D, z=True, dt_bias=True,
                      dt_softplus=True, gap=True, views=True)
    grads = {}
    for impl in ("cpp", "sequential"):
        monkeypatch.setenv("MAMBAPRUNE_SCAN_IMPL", impl)
        leaves = {k: v.detach().clone().requires_grad_() if k in SSD_GRAD_NAMES else v for k, v in args.items()}
        y = ssd_scan(**leaves)
        grads[impl] = torch.autograd.grad(y, [leaves[k] for k in SSD_GRAD_NAMES], torch.cos(y.detach()))
    for name, ours, theirs in zip(SSD_GRAD_NAMES, grads["cpp"], grads["sequential"]):
        assert ours.shape == args[name].shape
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10, msg=name)


def test_only_the_needed_gradients_are_computed():
    args = ssd_inputs(D="head", z=True, dt_bias=True)
    args["dt"].requires_grad_()
    y = ssd_scan(**args)
    (grad_dt,) = torch.autograd.grad(y.sum(), [args["dt"]])
    assert grad_dt.shape == args["dt"].shape and all(
        not args[k].requires_grad for k in SSD_GRAD_NAMES if k != "dt" and k in args)


@pytest.mark.parametrize("options", [dict(), dict(D="channel", z=True, dt_bias=True, dt_softplus=True, gap=True)],
                         ids=combo_id)
def test_opcheck_schema_fake_kernel_and_autograd_registration(options):
    args = ssd_inputs(batch=2, length=6, heads=4, headdim=3, groups=2, dstate=3, views=True, **options)
    args["x"] = args["x"].requires_grad_()
    torch.library.opcheck(SSD_OP, tuple(ssd_positional(args)))


class TinySsdMixer(torch.nn.Module):
    """in_proj -> (z, x, B, C, dt) views -> ssd_scan -> out_proj, as mamba_ssm's Mamba2 lays it out."""

    def __init__(self, dim=8, heads=4, headdim=4, groups=2, dstate=5, D_per_channel=False):
        super().__init__()
        self.shape = (heads, headdim, groups, dstate)
        inner = heads * headdim
        self.in_proj = torch.nn.Linear(dim, 2 * inner + 2 * groups * dstate + heads)
        self.out_proj = torch.nn.Linear(inner, dim)
        self.A_log = torch.nn.Parameter(torch.rand(heads))
        self.D = torch.nn.Parameter(torch.randn(heads, headdim) if D_per_channel else torch.randn(heads))
        self.dt_bias = torch.nn.Parameter(torch.randn(heads) * 0.3)

    def forward(self, tokens, gap):
        heads, headdim, groups, dstate = self.shape
        inner = heads * headdim
        z, x, B, C, dt = self.in_proj(tokens).split([inner, inner, groups * dstate, groups * dstate, heads], -1)
        y = ssd_scan(x.unflatten(-1, (heads, headdim)), dt, -torch.exp(self.A_log), B.unflatten(-1, (groups, dstate)),
                     C.unflatten(-1, (groups, dstate)), self.D, z.unflatten(-1, (heads, headdim)), self.dt_bias,
                     True, gap)
        return self.out_proj(y.flatten(2))


def _mixer_inputs(batch, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 8, generator=g), torch.randint(1, 3, (batch, length), generator=g)


def test_export_keeps_the_ssd_scan_as_one_node_with_dynamic_batch():
    model = TinySsdMixer()
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, _mixer_inputs(2), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(SSD_OP) == 1
    assert not any("selective_scan" in str(t) or "mambaprune_cpu" in str(t) for t in targets)
    other = _mixer_inputs(5, seed=1)
    torch.testing.assert_close(exported.module()(*other), model(*other))


def test_torch_compile_sees_the_ssd_scan_as_one_node_and_trains():
    model = TinySsdMixer()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    inputs = _mixer_inputs(3)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(t in (SSD_OP, torch.ops.mambaprune.ssd_scan) for t in targets) == 1
    compiled(*inputs).square().sum().backward()
    assert model.A_log.grad is not None and model.dt_bias.grad.abs().sum() > 0


def test_flop_counter_counts_twice_the_chunked_ssd_macs_computed_by_hand():
    """batch 2, L 300 (chunks of 256 and 44 tokens), heads 4, headdim 3, groups 2, N 5, with D and z:
    per sample 2*(256^2+44^2)*5 + 4*(256^2+44^2)*3 + 4*2*300*5*3 + 4*2*5*3 + 2*4*300*3
    = 674720 + 809664 + 36000 + 120 + 7200 = 1527704 MACs."""
    args = ssd_inputs(batch=2, length=300, heads=4, headdim=3, groups=2, dstate=5, D="head", z=True)
    with FlopCounterMode(display=False) as counter:
        ssd_scan(**args)
    assert counter.get_total_flops() == 2 * 2 * 1527704
    assert ssd_scan_macs(tuple(args["x"].shape), tuple(args["B"].shape), True, True) == 2 * 1527704
    # one chunk of 10 tokens, no D / z: 1 * 100 * 2 + 2 * 100 * 3 + 2 * 2 * 10 * 2 * 3 + 2 * 1 * 2 * 3
    assert ssd_scan_macs((1, 10, 2, 3), (1, 10, 1, 2), False, False) == 200 + 600 + 240 + 12


@pytest.mark.parametrize("name,bad,message", [
    ("dt", torch.zeros(2, 11, 5), r"dt must have shape \(batch, L, heads\) = \(2, 11, 6\)"),
    ("A", torch.zeros(6, 4), r"A must have shape \(heads,\)"),
    ("B", torch.zeros(2, 11, 4, 4), r"groups dividing heads=6"),
    ("D", torch.zeros(6, 4), r"D must have shape \(heads,\) = \(6,\) or \(heads, headdim\) = \(6, 5\)"),
    ("dt_bias", torch.zeros(5), r"dt_bias must have shape \(heads,\)"),
    ("gap", torch.zeros(2, 10, dtype=torch.int64), r"gap must have shape \(batch, L\) = \(2, 11\)"),
    ("gap", torch.ones(2, 11, dtype=torch.bool), r"gap must be a real integer or floating-point tensor"),
    ("x", torch.zeros(2, 11, 30), r"x must have shape \(batch, L, heads, headdim\) \(4 dims\)"),
])
def test_wrong_arguments_name_the_argument_and_the_expected_shape(name, bad, message):
    args = dict(ssd_inputs(), **{name: bad})
    with pytest.raises(ValueError, match=message):
        ssd_scan(**args)


@pytest.mark.parametrize("D_per_channel", [False, True])
@pytest.mark.parametrize("scan_form", ["scan", "doubling"])
def test_onnx_translation_runs_in_onnxruntime_like_the_op(scan_form, D_per_channel, tmp_path):
    """Both ONNX forms of the SSD op (standard ops only), with every option, a dynamic batch and 37
    tokens (not a power of two: the last doubling round)."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from mambaprune.deployment.onnx_ops import custom_translation_table

    model = TinySsdMixer(D_per_channel=D_per_channel)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, _mixer_inputs(2, length=37), dynamic_shapes=({0: batch}, {0: batch}))
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=custom_translation_table(scan_form),
                                     opset_version=18)
    path = str(tmp_path / "ssd.onnx")
    onnx_program.save(path, external_data=False)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert ("Scan" in {n.op_type for n in onnx.load(path).graph.node}) == (scan_form == "scan")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    tokens, gap = _mixer_inputs(5, length=37, seed=1)
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (tokens.numpy(), gap.numpy()))))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(tokens, gap), atol=1e-5, rtol=1e-5)
