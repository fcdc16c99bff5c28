"""benchmarks/op_overhead.py: the three ways it calls each op compute the same thing, and --quick runs end to end."""
import json
import math

import torch

from benchmark_modules import load_benchmark

op_overhead = load_benchmark("op_overhead")


def test_body_op_and_custom_op_twin_agree_on_every_op():
    args, twins, bodies = op_overhead.inputs(2), op_overhead.custom_op_twins_once(), op_overhead.bodies()
    with torch.no_grad():
        for key, (_, op) in op_overhead.OPS.items():
            expected = op(*args[key])
            torch.testing.assert_close(bodies[key](*args[key]), expected, rtol=0, atol=0)
            torch.testing.assert_close(twins[key](*args[key]), expected, rtol=0, atol=0)


def test_the_twin_trains_like_the_op():
    x, weight, bias, pos, left = op_overhead.inputs(1)["conv"]
    grads = []
    for op in (torch.ops.mambaprune.pos_conv1d.default, op_overhead.custom_op_twins_once()["conv"]):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        op(*leaves, pos, left).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_quick_run_writes_finite_numbers(tmp_path):
    op_overhead.main(["--quick", "--out", str(tmp_path / "overhead")])
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert {r["op"] for r in result["rows"]} == {"pos_conv1d", "selective_scan", "path_order"}
    for row in result["rows"]:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("body_us", "op_us", "custom_op_us"))
    assert "| pos_conv1d | 1 |" in (tmp_path / "overhead.md").read_text()
