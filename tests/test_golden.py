"""The golden zoo (tests/golden_zoo.py): every model's token facts, analysis, reports, outputs and kept
tokens are what tests/golden/ recorded.

The facts and reports are compared exactly. Outputs are compared to fp32 noise (the recording and
this run may use different CPUs); kept positions exactly. Regenerate with `python tests/golden_zoo.py`
only for a deliberate change of behaviour, and review the diff of facts.json.
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import golden_zoo  # noqa: E402

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def golden():
    with open(golden_zoo.FACTS_FILE) as f:
        facts = json.load(f)
    return facts, safetensors.load_file(golden_zoo.OUTPUTS_FILE)


def test_the_golden_zoo_covers_every_case(golden):
    assert sorted(golden[0]) == sorted(golden_zoo.CASES)


def every_node_has_a_value(pruned):
    nodes = [n.name for n in pruned.graph_module.graph.nodes
             if n.op in ("placeholder", "call_function") and "val" not in n.meta]
    assert not nodes, f"pruned-graph nodes without meta['val']: {nodes[:5]}"


@pytest.mark.parametrize("case", sorted(golden_zoo.CASES))
def test_case_is_unchanged(golden, case):
    """Also: every node of every pruned graph carries meta["val"]."""
    facts, tensors = golden
    got_facts, got_tensors = golden_zoo.record_case(case, inspect=every_node_has_a_value)
    expected = facts[case]
    for key in sorted(set(expected) | set(got_facts)):
        assert got_facts.get(key) == expected.get(key), f"{case}: {key} differs from the golden record"
    wanted = {k: v for k, v in tensors.items() if k.startswith(case + "/")}
    assert sorted(got_tensors) == sorted(wanted)
    for key, value in wanted.items():
        got = got_tensors[key]
        if value.is_floating_point():
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got, value), key
