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


def test_report_with_a_merging_reduction(capsys):
    assert main(["report", TINY, "--ratio", "0.3", "--reduction", "merge-similar"]) == 0
    assert "reduction=merge-similar" in capsys.readouterr().out


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


# -- issue 19, item 9 --------------------------------------------------------------------------------
def test_a_factory_that_raises_is_one_line_and_exit_2(capsys):
    assert main(["report", "cli_factories:raising"]) == 2
    err = capsys.readouterr().err
    assert err == "mambaprune: error: cli_factories:raising() raised RuntimeError: the checkpoint server is down\n"


@pytest.mark.parametrize("argv", [
    ["bench", TINY, "--batch", "0"], ["bench", TINY, "--repeat", "0"], ["bench", "vim_t", "--img-size", "0"],
    ["report", "vim_t", "--img-size", "-3"], ["report", TINY, "--input-shape", "3,x,32"],
])
def test_sizes_and_counts_must_be_positive_integers(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_img_size_with_a_factory_is_refused(capsys):
    assert main(["report", TINY, "--img-size", "64"]) == 2
    assert "--img-size applies to registered architectures only" in capsys.readouterr().err


def test_the_output_folder_is_checked_before_compiling(tmp_path, monkeypatch, capsys):
    import mambaprune
    monkeypatch.setattr(mambaprune, "compile_pruned", lambda *a, **k: pytest.fail("compiled before the check"))
    assert main(["compile", TINY, "-o", str(tmp_path / "missing" / "model.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compile", TINY, "-o", str(tmp_path / "model.bin")]) == 2
    assert "cannot tell the export format" in capsys.readouterr().err


def test_auto_alignment_on_a_calibration_file_with_an_input_shape(tmp_path, capsys):
    import torch
    images = tmp_path / "calibration.pt"
    torch.save(torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0)), images)
    assert main(["report", TINY, "--alignment", "auto", "--calibration", str(images), "--input-shape", "3,32,32"]) == 0
    assert "alignment='auto' chose" in capsys.readouterr().out
    assert main(["report", TINY, "--alignment", "auto"]) == 2   # no calibration: the library's one-line error
    assert "calibration" in capsys.readouterr().err
    assert main(["report", TINY, "--alignment", "auto", "--calibration", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_calibration_folder_is_read_like_the_same_images_in_a_tensor_file(tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    folder, pixels = tmp_path / "images", np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    tensor = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25   # what the folder must give
    torch.save(tensor, tmp_path / "same.pt")
    common = ["report", TINY, "--alignment", "auto", "--input-shape", "3,32,32"]
    outputs = []
    for source in ([str(folder), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"], [str(tmp_path / "same.pt")]):
        assert main(common + ["--calibration", *source]) == 0
        outputs.append(capsys.readouterr().out)
    assert "alignment='auto' chose" in outputs[0] and outputs[0] == outputs[1]
