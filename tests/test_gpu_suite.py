"""benchmarks/gpu_suite.py end to end in its --quick CPU mode: every section present, every number finite
(two minutes on one core: the long tier, `--long`)."""
import importlib.util
import json
from pathlib import Path

import pytest

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.long
def test_quick_suite_writes_every_section_with_finite_numbers(tmp_path):
    suite = _suite()
    suite.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    for section in ("scan", "dense", "pruned", "token_ops", "cudagraph", "cuda_tests"):
        assert result[section], section
    assert set(result["scan"]) == {"float32", "bfloat16"}
    assert set(result["pruned"]) == {"0", "top", "0.5", "control"}
    assert set(result["cudagraph"]) == {"top", "0.5"}
    assert all(0 <= t["share"] < 1 for t in result["token_ops"].values())
    assert result["cuda_tests"]["returncode"] in (0, 5)  # 5: pytest found nothing to run (all deselected)
    assert suite.finite_numbers(result)
    assert "| scan" in (tmp_path / "gpu_suite.md").read_text()


def test_finite_numbers_finds_a_nan_anywhere():
    suite = _suite()
    assert suite.finite_numbers({"a": [1, 2.0, {"b": 3.5}], "c": "text", "d": True})
    assert not suite.finite_numbers({"a": [1, {"b": float("nan")}]})
    assert not suite.finite_numbers([float("inf")])
