"""Passes on hand-built graphs: FLOPs annotation, and the prune rewrite's invariants."""
import torch
import torch.fx as fx

from mambaprune.compiler.analysis import analyse
from mambaprune.compiler.capture import capture
from mambaprune.models import create_model
from mambaprune.passes.annotate_flops import FLOPS_KEY, annotate_flops, total_flops
from mambaprune.passes.prune_tokens import SiteSpec, prune_tokens


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


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


def tiny_vim():
    torch.manual_seed(0)
    return create_model("vim_t", img_size=32, patch_size=8, depth=3, embed_dim=32, d_state=4).eval()


def test_prune_tokens_without_sites_returns_the_graph_unchanged():
    captured = capture(tiny_vim(), (torch.randn(1, 3, 32, 32),))
    result = prune_tokens(captured.gm, analyse(captured.gm), [], "hold", "clip")
    assert result.modified is False and result.graph_module is captured.gm


def test_prune_tokens_keeps_k_tokens_after_the_site_and_leaves_the_input_graph_alone():
    model = tiny_vim()
    captured = capture(model, (torch.randn(1, 3, 32, 32),))
    analysis = analyse(captured.gm)
    before = captured.gm.code
    result = prune_tokens(captured.gm, analysis, [SiteSpec(2, 9)], "hold", "clip")
    assert result.modified and captured.gm.code == before
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
