"""The pipeline's passes under torch.fx's pass infrastructure: each on a hand-built or tiny captured
graph, its invariant, idempotence, numerics, and errors that name the pass."""
import pytest
import torch
import torch.fx as fx

from mambaprune.analysis import AnalyseGraph, analyse
from mambaprune.capture import capture, run_graph
from mambaprune.errors import UnsupportedModelError
from mambaprune.meta_keys import FLOPS as FLOPS_KEY
from mambaprune.meta_keys import TOKENS
from mambaprune.models import create_model
from mambaprune.pass_infra import GraphPass, InvariantError, PassResult, run_passes
from mambaprune.planning import AnnotateFlops, annotate_flops, total_flops
from mambaprune.rewrite import PropagateMeta, PruneTokens, SiteSpec, prune_tokens
from mambaprune.settings import PruneSettings

HOLD_CLIP = PruneSettings(alignment="hold", metric="clip")


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def tiny_vim():
    torch.manual_seed(0)
    return create_model("vim_t", img_size=32, patch_size=8, depth=3, embed_dim=32, d_state=4).eval()


@pytest.fixture(scope="module")
def captured():
    return capture(tiny_vim(), (torch.randn(1, 3, 32, 32),))


# ----------------------------------------------------------------------------------- AnnotateFlops
def test_annotate_flops_counts_macs_per_node_exactly_and_changes_nothing():
    gm = fx.symbolic_trace(TwoLinears())
    code = gm.code
    result = annotate_flops(gm, [torch.randn(2, 5, 4)])
    assert result.modified is False and result.graph_module.code == code
    by_name = {n.name: n.meta[FLOPS_KEY] for n in gm.graph.nodes}
    assert by_name["a"] == 2 * 5 * 4 * 3 and by_name["b"] == 2 * 5 * 3 * 2 and by_name["relu"] == 0
    assert total_flops(gm) == 2 * 5 * (4 * 3 + 3 * 2)
    annotate_flops(gm, [torch.randn(2, 5, 4)])
    assert total_flops(gm) == 2 * 5 * (4 * 3 + 3 * 2)      # idempotent


# ------------------------------------------------------------------------------------ AnalyseGraph
def test_analyse_graph_puts_a_fact_on_every_node_and_is_idempotent(captured):
    analysed = AnalyseGraph()
    result = run_passes([analysed], captured.gm)
    assert result.modified is False and result.graph_module is captured.gm
    assert all(TOKENS in n.meta for n in captured.gm.graph.nodes)
    facts = {n.name: n.meta[TOKENS] for n in captured.gm.graph.nodes}
    assert len(analysed.result.blocks) == 3 and analysed.result.valid_sites == [1, 2]
    run_passes([AnalyseGraph()], captured.gm)
    assert {n.name: n.meta[TOKENS] for n in captured.gm.graph.nodes} == facts


# ------------------------------------------------------------------------------------- PruneTokens
def test_prune_tokens_without_sites_returns_the_graph_unchanged(captured):
    result = prune_tokens(captured.gm, analyse(captured.gm), [], HOLD_CLIP)
    assert result.modified is False and result.graph_module is captured.gm


def test_prune_tokens_keeps_k_tokens_after_the_site_and_leaves_the_input_graph_alone(captured):
    model = tiny_vim()
    analysis = analyse(captured.gm)
    before = captured.gm.code, dict(captured.gm.named_buffers()).keys()
    result = prune_tokens(captured.gm, analysis, [SiteSpec(2, 9)], HOLD_CLIP)
    assert result.modified and result.graph_module is not captured.gm
    assert (captured.gm.code, dict(captured.gm.named_buffers()).keys()) == before
    scans = [n for n in result.graph_module.graph.nodes if "selective_scan" in str(n.target)]
    lengths = []

    class Shapes(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in scans:
                lengths.append(out.shape[-1])
            return out

    x = torch.randn(2, 3, 32, 32)
    out = Shapes(result.graph_module).run(x)
    assert lengths == [17, 17, 17, 17, 9, 9]          # blocks 0-1 dense (2 scans each), block 2 pruned
    assert out.shape == model(x).shape


def test_prune_tokens_is_deterministic_and_keep_all_reproduces_the_dense_graph(captured):
    analysis = analyse(captured.gm)
    first = prune_tokens(captured.gm, analysis, [SiteSpec(1, 17)], HOLD_CLIP).graph_module
    second = prune_tokens(captured.gm, analysis, [SiteSpec(1, 17)], HOLD_CLIP).graph_module
    assert first.code == second.code
    x = [torch.randn(3, 3, 32, 32)]
    torch.testing.assert_close(run_graph(first, x)[0], run_graph(captured.gm, x)[0], rtol=1e-5, atol=1e-6)


def test_prune_tokens_requires_a_concrete_alignment_and_names_itself(captured):
    analysis = analyse(captured.gm)
    with pytest.raises(Exception, match="'PruneTokens' pass") as raised:
        run_passes([PruneTokens(analysis, [SiteSpec(1, 9)], PruneSettings(alignment="auto"))], captured.gm)
    assert isinstance(raised.value.__cause__, InvariantError)


# ----------------------------------------------------------------------------------- PropagateMeta
def test_propagate_meta_gives_every_node_a_value_with_a_symbolic_batch(captured):
    analysis = analyse(captured.gm)
    flat = [torch.randn(1, 3, 32, 32)]
    result = run_passes([PruneTokens(analysis, [SiteSpec(1, 9)], HOLD_CLIP), PropagateMeta(flat)], captured.gm)
    gm = result.graph_module
    values = {n: n.meta["val"] for n in gm.graph.nodes if n.op == "call_function"}
    assert all("val" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function"))
    real = {}

    class Record(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            real[node] = out
            return out

    Record(gm).run(torch.randn(3, 3, 32, 32))
    tensors = {n: v for n, v in values.items() if isinstance(v, torch.Tensor) and v.dim()}
    for node, fake in tensors.items():      # the shapes of a run with batch 3, the batch symbolic
        assert tuple(fake.shape[1:]) == tuple(real[node].shape[1:]), node.name
        assert isinstance(fake.shape[0], torch.SymInt) or fake.shape[0] == real[node].shape[0], node.name
    assert sum(isinstance(v.shape[0], torch.SymInt) for v in tensors.values()) > len(tensors) // 2


# ---------------------------------------------------------------------------------- infrastructure
class Breaks(GraphPass):
    def call(self, gm):
        return PassResult(gm, False)

    def ensures(self, gm):
        raise InvariantError("broken on purpose")


class Refuses(GraphPass):
    def call(self, gm):
        raise UnsupportedModelError("the user must read this")


def test_a_broken_invariant_names_its_pass_and_a_refusal_reaches_the_user_unwrapped():
    gm = fx.symbolic_trace(TwoLinears())
    with pytest.raises(Exception, match="'Breaks' pass after the following passes: \\['AnnotateFlops'\\]"):
        run_passes([AnnotateFlops([torch.randn(1, 4)]), Breaks()], gm)
    with pytest.raises(UnsupportedModelError, match="the user must read this"):
        run_passes([Refuses()], gm)


# ----------------------------------------------------------------------------------- DropNoOps
class Casts(torch.nn.Module):
    """A `.float()` that does nothing on fp32 inputs and a `.half()` round trip that converts."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x.float())
        return y.half().float() + y


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_drop_no_ops_drops_checks_and_no_op_casts_only_and_leaves_its_input_alone(captured):
    from mambaprune.rewrite import DropNoOps

    casts = capture(Casts(), (torch.randn(2, 4),)).gm
    for gm in (captured.gm, casts):
        before, code = _targets(gm), gm.code
        out = run_passes([DropNoOps()], gm).graph_module
        assert out is not gm and _targets(gm) == before and gm.code == code
        kept = _targets(out)
        assert torch.ops.aten._assert_tensor_metadata.default not in kept
        removed = len(before) - len(kept)
        assert removed == 2 * before.count(torch.ops.aten._assert_tensor_metadata.default) - (gm is casts) * 2
        x = torch.randn(3, *((3, 32, 32) if gm is captured.gm else (4,)))
        with torch.no_grad():
            assert all(map(torch.equal, run_graph(out, (x,)), run_graph(gm, (x,))))
    # the .half() and its .float() back convert: both stay
    assert _targets(run_passes([DropNoOps()], casts).graph_module).count(torch.ops.aten.to.dtype) == 2


def test_a_pruned_model_runs_no_metadata_checks_and_no_op_casts():
    from mambaprune import compile_pruned

    x = torch.randn(2, 3, 32, 32)
    for ratio in (0.0, 0.3):
        pruned = compile_pruned(tiny_vim(), ratio=ratio, example_inputs=(x[:1],))
        targets = _targets(pruned.graph_module)
        assert torch.ops.aten._assert_tensor_metadata.default not in targets
        assert torch.ops.aten.to.dtype not in targets   # every cast of this fp32 model is a no-op
