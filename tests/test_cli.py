"""The `mambaprune` command line: compile / report / bench, help, and one-line errors."""
import sys
from pathlib import Path

import pytest

from mambaprune.__main__ import main

sys.path.insert(0, str(Path(__file__).parent))  # cli_factories is importable as a module
TINY = "cli_factories:tiny_vim"


def test_report_prints_the_compiler_report(capsys):
    assert main(["report", TINY, "--ratio", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "mambaprune report: 6 SSM blocks" in out and "reduction" in out


def test_compile_writes_a_pt2_file(tmp_path, capsys):
    target = tmp_path / "tiny.pt2"
    assert main(["compile", TINY, "--ratio", "0.3", "-o", str(target)]) == 0
    assert target.exists() and target.stat().st_size > 0
    assert "FLOPs reduction" in capsys.readouterr().out


def test_bench_prints_one_row_per_ratio(capsys):
    assert main(["bench", TINY, "--ratios", "0.3", "--batch", "2", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == "0.30"


@pytest.mark.parametrize("argv,message", [
    (["report", "no_such_module:factory"], "cannot import module"),
    (["report", "cli_factories:missing"], "has no callable 'missing'"),
    (["report", "cli_factories:not_a_model"], "not a torch.nn.Module"),
    (["report", "nonsense"], "unknown model 'nonsense'"),
    (["report", TINY, "--ratio", "1.5"], "ratio must be a number in [0, 1)"),
    (["compile", TINY, "-o", "model.xyz"], "format"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambaprune: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [[], ["demo"], ["compile"], ["report"], ["bench"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: mambaprune" in capsys.readouterr().out


def test_demo_chooses_its_alignment_on_validation_images_and_checks_its_onnx_export(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("onnxruntime")
    assert main(["demo", "--images", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the ViM checkpoint is best served by "none" (README, Fidelity); the demo must find that itself
    assert "alignment='auto' chose none" in out and "alignment=none" in out
    assert "test accuracy on 40 cluttered-digit images" in out and "onnxruntime matches PyTorch" in out
    assert (tmp_path / "kept_tokens.png").stat().st_size > 0
