"""Unrolled Python token loops lifted into one scan (capture/token_loops.py).

Five written forms of the same recurrence (transformers' slow path: discretised once, read with
`[:, :, i]`, read out by a matmul with a column; by hand: discretised per step, read out by a sum;
by hand with the skip D * u_t added to every step's readout; mamba_ssm's reference: einsums;
mamba.py's `selective_scan_seq`: the states stacked and read out after the loop by one matmul) are
each lifted into exactly one `mambaprune::selective_scan` whose graph computes the model's outputs,
at another batch size too. Loops that are not this recurrence, or that this lifting would change,
are left as they are: a loop that returns its final state, one that stops before the last token,
one whose decay is no exp(delta * A), one that adds a term other than D * u_t to its readout. A loop that walks the
tokens backwards is lifted as the scan of the flipped tokens. A small vision model written with the hand form is pruned with the standard checks (the
transformers form is in the zoo: tests/official_zoo/hf_mamba.py). A module that runs a long loop is
traced once by make_fx and exported with its loop already lifted (capture/loop_modules.py), and a
replay that does not compute the model is dropped for the export as written.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune.capture import capture, loop_modules, token_loops
from mambaprune.capture.token_loops import lift_token_loops
from mambaprune.meta_keys import module_of
from tests.official_zoo import checks

SCAN = torch.ops.mambaprune.selective_scan.default


class Mixer(nn.Module):
    """x (batch, L, d) -> the scan's y (batch, L, d), its loop written in one of several forms."""

    def __init__(self, form: str, d: int = 16, n: int = 4):
        super().__init__()
        self.form, self.n = form, n
        self.A_log = nn.Parameter(torch.rand(d, n) * 2 - 1)
        self.D = nn.Parameter(torch.randn(d))
        self.x_proj = nn.Linear(d, d + 2 * n)

    def parts(self, x):
        delta, B, C = torch.split(self.x_proj(x), [x.shape[-1], self.n, self.n], dim=-1)
        return F.softplus(delta), B, C, -torch.exp(self.A_log)

    def forward(self, x):
        return getattr(self, self.form)(x)

    def transformers(self, x):
        delta, B, C, A = self.parts(x)
        delta, u = delta.transpose(1, 2), x.transpose(1, 2)
        discrete_A = torch.exp(A[None, :, None, :] * delta[:, :, :, None])
        deltaB_u = delta[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None]
        ssm_state = torch.zeros(x.shape[0], x.shape[2], self.n)
        ys = []
        for i in range(x.shape[1]):
            ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]
            ys.append(torch.matmul(ssm_state.to(x.dtype), C[:, i, :].unsqueeze(-1))[:, :, 0])
        return torch.stack(ys, dim=-1).transpose(1, 2)

    def by_hand(self, x, steps=None, decay=torch.exp, final_state=False, skip=None):
        delta, B, C, A = self.parts(x)
        h, ys = x.new_zeros(x.shape[0], x.shape[2], self.n), []
        for t in range(x.shape[1] if steps is None else steps):
            h = decay(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
            y = (h * C[:, t, None, :]).sum(-1)
            ys.append(y if skip is None else y + self.D * skip[:, t])
        y = torch.stack(ys, dim=1)
        return (y, h) if final_state else y

    def skip_inside(self, x):
        return self.by_hand(x, skip=x)

    def states_stacked(self, x):
        """mamba.py's selective_scan_seq: hs.append(h), then one readout of torch.stack(hs)."""
        delta, B, C, A = self.parts(x)
        deltaA = torch.exp(delta.unsqueeze(-1) * A)
        BX = (delta.unsqueeze(-1) * B.unsqueeze(2)) * x.unsqueeze(-1)
        h, hs = torch.zeros(x.size(0), x.size(2), self.n), []
        for t in range(0, x.shape[1]):
            h = deltaA[:, t] * h + BX[:, t]
            hs.append(h)
        hs = torch.stack(hs, dim=1)
        return (hs @ C.unsqueeze(-1)).squeeze(3) + self.D * x

    def reference(self, x):
        delta, B, C, A = self.parts(x)
        delta, B, C, u = delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2), x.transpose(1, 2)
        deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        h, ys = A.new_zeros((u.shape[0], u.shape[1], self.n)), []
        for i in range(u.shape[2]):
            h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
        return torch.stack(ys, dim=2).transpose(1, 2)

    # loops that are not lifted
    def final_state(self, x):
        y, h = self.by_hand(x, final_state=True)
        return y, h

    def short(self, x):
        return self.by_hand(x, steps=x.shape[1] - 1)

    def sigmoid_decay(self, x):
        return self.by_hand(x, decay=torch.sigmoid)

    def skip_of_delta(self, x):
        return self.by_hand(x, skip=F.softplus(self.x_proj(x)[..., :x.shape[-1]]))

    def backwards(self, x, order=lambda length: reversed(range(length)), in_step_order=False):
        delta, B, C, A = self.parts(x)
        h, ys = x.new_zeros(x.shape[0], x.shape[2], self.n), []
        for t in order(x.shape[1]):
            h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
            ys.append((h * C[:, t, None, :]).sum(-1))
        return torch.stack(ys if in_step_order else ys[::-1], dim=1)

    def backwards_stacked_in_step_order(self, x):
        return self.backwards(x, in_step_order=True)

    def shuffled(self, x):
        return self.backwards(x, order=lambda length: [(5 * t) % length for t in range(length)], in_step_order=True)


def exported(module, length=6):
    x = torch.randn(2, length, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False).module()


def count(gm, target) -> int:
    return sum(1 for node in gm.graph.nodes if node.target is target)


@pytest.mark.parametrize("form", ["transformers", "by_hand", "skip_inside", "states_stacked", "reference", "backwards",
                                  "backwards_stacked_in_step_order"])
def test_each_written_form_is_lifted_into_one_scan_that_computes_the_loop(form):
    torch.manual_seed(0)
    module = Mixer(form).eval()
    gm = exported(module)
    lifted_gm, lifted = lift_token_loops(gm)
    assert [(loop.steps, loop.backward) for loop in lifted] == [(6, form.startswith("backwards"))]
    assert count(lifted_gm, SCAN) == 1 and count(lifted_gm, torch.ops.aten.stack.default) == 0
    assert count(gm, SCAN) == 0, "the input graph module is not changed"
    scan = next(node for node in lifted_gm.graph.nodes if node.target is SCAN)
    assert (len(scan.args) > 5 and scan.args[5] is not None) == (form == "skip_inside"), "D only from the skip"
    x = torch.randn(5, 6, 16)
    torch.testing.assert_close(lifted_gm(x), module(x), rtol=1e-5, atol=1e-5)


def test_a_lifted_graph_that_disagrees_with_the_loop_on_the_example_inputs_is_not_used(monkeypatch):
    """A deliberate misreading (B and C swapped) lifts a wrong scan: the check on the inputs drops it."""
    torch.manual_seed(0)
    module = Mixer("by_hand").eval()
    gm, x = exported(module), torch.randn(2, 6, 16)
    read = token_loops.read_scan

    def swapped(step):
        reading = read(step)
        parts = dict(reading.parts)
        parts["B"], parts["C"] = parts["C"], parts["B"]
        return dataclasses.replace(reading, parts=parts)

    monkeypatch.setattr(token_loops, "read_scan", swapped)
    wrong, lifted = lift_token_loops(gm)
    assert lifted and (wrong(x) - module(x)).abs().max() > 1e-3
    assert lift_token_loops(gm, (x,)) == (gm, [])


@pytest.mark.parametrize("form", ["final_state", "short", "sigmoid_decay", "shuffled", "skip_of_delta"])
def test_loops_that_are_not_the_scan_over_all_tokens_are_left_alone(form):
    torch.manual_seed(0)
    gm = exported(Mixer(form).eval())
    same, lifted = lift_token_loops(gm)
    assert lifted == [] and same is gm


class HandWrittenVim(nn.Module):
    """Patches -> blocks of (norm, in_proj to x and z, the hand-written loop scan, forwards and, when
    bidirectional, backwards with its own parameters, summed, gate, out_proj) -> mean -> head."""

    def __init__(self, dim=16, depth=3, img_size=16, patch=4, bidirectional=True, form="by_hand"):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.in_projs = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(depth))
        self.mixers = nn.ModuleList(Mixer(form, d=dim) for _ in range(depth))
        self.mixers_b = nn.ModuleList(Mixer("backwards", d=dim) for _ in range(depth)) if bidirectional else None
        self.out_projs = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        for i, (norm, in_proj, mixer, out_proj) in enumerate(zip(self.norms, self.in_projs, self.mixers, self.out_projs)):
            u, z = in_proj(norm(x)).chunk(2, dim=-1)
            y = mixer(u) + (self.mixers_b[i](u) if self.mixers_b is not None else 0)
            x = x + out_proj(y * F.silu(z))
        return self.head(x.mean(1))


@pytest.mark.parametrize("form", ["by_hand", "skip_inside", "states_stacked"])
def test_a_model_with_hand_written_loops_is_pruned_with_the_standard_checks(form):
    torch.manual_seed(0)
    model = HandWrittenVim(form=form).eval()
    out = checks.run("hand-written loops", model, model.img_size)
    assert checks.green(out), out
    assert "Python token loop, lifted into one scan x6" in str(out.report)
    assert "2 scans (identity, flip)" in str(out.report)


def test_a_module_running_a_long_loop_is_traced_once_and_exported_with_its_loop_lifted(monkeypatch):
    """capture/loop_modules.py: the loop module's forward, traced by make_fx at batches 2 and 3 and lifted,
    is what torch.export sees: the exported program already holds one scan per loop, under the loop
    module's name, with the model's parameter names, and computes the model at any batch."""
    monkeypatch.setattr(loop_modules, "LOOP_OPS", 50)        # the tiny loops here run ~100 ops each
    torch.manual_seed(0)
    model = HandWrittenVim(form="states_stacked").eval()
    captured = capture(model, (torch.randn(1, 3, 16, 16),))
    scans = [n for n in captured.program.graph.nodes if n.target is SCAN]
    assert [module_of(n) for n in scans] == ["mixers.0", "mixers_b.0", "mixers.1", "mixers_b.1", "mixers.2",
                                             "mixers_b.2"]
    assert count(captured.program.graph_module, torch.ops.aten.stack.default) == 0
    assert set(captured.program.state_dict) == set(model.state_dict())
    assert captured.routed == [f"{m} (Python token loop, lifted into one scan)" for m in map(module_of, scans)]
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(captured.gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_replayed_loop_module_that_does_not_compute_the_model_is_exported_as_written(monkeypatch):
    """A deliberate misreading of the replay (its output doubled): the check at two batch sizes drops it,
    the loop is exported unrolled and lifted afterwards."""
    monkeypatch.setattr(loop_modules, "LOOP_OPS", 50)
    forward = loop_modules._forward
    monkeypatch.setattr(loop_modules, "_forward", lambda module, replay: lambda *a: 2 * forward(module, replay)(*a))
    torch.manual_seed(0)
    model = HandWrittenVim(depth=1, bidirectional=False).eval()
    captured = capture(model, (torch.randn(1, 3, 16, 16),))
    assert count(captured.program.graph_module, SCAN) == 0, "exported unrolled"
    assert count(captured.gm, SCAN) == 1, "lifted after the export"
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(captured.gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_loop_module_whose_replay_cannot_be_built_is_exported_as_written(monkeypatch):
    monkeypatch.setattr(loop_modules, "LOOP_OPS", 50)

    def broken(*args):
        raise RuntimeError("a failure while generalising the traces")

    monkeypatch.setattr(loop_modules, "_general", broken)
    torch.manual_seed(0)
    model = HandWrittenVim(depth=1, bidirectional=False).eval()
    captured = capture(model, (torch.randn(1, 3, 16, 16),))
    assert count(captured.program.graph_module, SCAN) == 0 and count(captured.gm, SCAN) == 1
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(captured.gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.long
def test_transformers_loop_of_576_tokens_is_captured_through_its_loop_module_and_pruned():
    """At the real threshold: transformers' slow path over 576 tokens, three blocks, is exported with its
    loops lifted before the export (each mixer runs ~4600 ops of its own) and pruned with the standard
    checks (about a minute here, two captures; without loop_modules.py torch.export would unroll 3 x 576 steps)."""
    from tests import official_zoo
    with official_zoo.installed():
        hf = official_zoo.family("hf_mamba")
        torch.manual_seed(0)
        model = hf.MambaForImageClassification(hf.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=3),
                                               img_size=96).eval()
        captured = capture(model, (torch.randn(1, 3, 96, 96),))
        assert count(captured.program.graph_module, SCAN) == 3, "lifted before the export"
        out = checks.run("transformers, 576 tokens", model, 96)
    assert checks.green(out), out
